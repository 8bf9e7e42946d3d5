//! roundabout patch "An exchange's buffers come from the pool" (VENDORED.md): a pooled
//! connection holds no buffer, and an exchange takes its buffers from the thread's
//! `buffer_pool` and gives them back, so a client sending request after request allocates no
//! 8 KiB buffer for them (upstream: a `Framed` with two per exchange).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    convert::Infallible,
};

use actix_http::{h1::buffer_pool, HttpService, Request, Response};
use actix_http_test::test_server;
use actix_service::fn_service;
use bytes::Bytes;
use futures_util::StreamExt as _;

/// Counts the allocations of 8 KiB or more made on each thread.
struct CountLarge;

thread_local! {
    static LARGE: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every call is passed on to the system allocator unchanged.
unsafe impl GlobalAlloc for CountLarge {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= 8 * 1024 {
            let _ = LARGE.try_with(|n| n.set(n.get() + 1));
        }
        System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: CountLarge = CountLarge;

fn large_allocations() -> usize {
    LARGE.with(Cell::get)
}

async fn echo_server() -> actix_http_test::TestServer {
    test_server(|| {
        HttpService::build()
            .h1(fn_service(|mut req: Request| async move {
                // `/big` answers 64 KiB; anything else echoes the request body.
                if req.path() == "/big" {
                    return Ok::<_, Infallible>(Response::ok().set_body(vec![b'x'; 64 * 1024]));
                }
                let mut body = Vec::new();
                let mut payload = req.take_payload();
                while let Some(chunk) = payload.next().await {
                    body.extend_from_slice(&chunk.unwrap());
                }
                Ok(Response::ok().set_body(body))
            }))
            .tcp()
    })
    .await
}

#[actix_rt::test]
async fn exchanges_allocate_no_buffer_and_leave_none_lent() {
    let srv = echo_server().await;
    let client = awc::Client::new();

    // The first exchange fills the pool.
    let mut res = client.post(srv.url("/")).send_body("hello").await.unwrap();
    assert_eq!(res.body().await.unwrap(), "hello");
    let before = large_allocations();

    for _ in 0..20 {
        let mut res = client.post(srv.url("/")).send_body("hello").await.unwrap();
        assert_eq!(res.body().await.unwrap(), "hello");
        // The body is read: neither the exchange nor its pooled connection holds a buffer.
        assert_eq!(buffer_pool::stats().lent, 0);
    }

    assert_eq!(
        large_allocations() - before,
        0,
        "8 KiB buffers allocated per exchange"
    );
    assert!(buffer_pool::stats().free >= 1);
}

#[actix_rt::test]
async fn large_bodies_both_ways_and_early_drops_give_every_buffer_back() {
    let srv = echo_server().await;
    let client = awc::Client::new();

    // A request body larger than the pool's buffers, echoed back.
    let big = Bytes::from(vec![b'y'; 100 * 1024]);
    let mut res = client
        .post(srv.url("/"))
        .send_body(big.clone())
        .await
        .unwrap();
    assert_eq!(res.body().limit(1 << 20).await.unwrap(), big);
    assert_eq!(buffer_pool::stats().lent, 0);

    // An answer larger than the pool's buffers.
    let mut res = client.get(srv.url("/big")).send().await.unwrap();
    assert_eq!(res.body().limit(1 << 20).await.unwrap().len(), 64 * 1024);
    assert_eq!(buffer_pool::stats().lent, 0);

    // An answer dropped before its body is read: the exchange's buffer goes back.
    let res = client.get(srv.url("/big")).send().await.unwrap();
    drop(res);
    assert_eq!(buffer_pool::stats().lent, 0);

    // The connection that was dropped mid-body is not reused; the next request works.
    let mut res = client.post(srv.url("/")).send_body("again").await.unwrap();
    assert_eq!(res.body().await.unwrap(), "again");
    assert_eq!(buffer_pool::stats().lent, 0);
}
