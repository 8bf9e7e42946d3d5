//! roundabout patch "Buffers from a per-thread pool" (VENDORED.md): a connection holds a read
//! or write buffer only while bytes wait in it.

use std::{cell::RefCell, pin::pin};

use actix_service::fn_service;
use futures_util::future::lazy;
use tokio::sync::oneshot;

use super::*;
use crate::{
    h1::{ExpectHandler, UpgradeHandler},
    test::TestBuffer,
    Error,
};

const GET: &str = "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n";

fn ok_flow() -> Rc<
    HttpFlow<
        impl Service<Request, Response = Response<&'static str>, Error = Error>,
        ExpectHandler,
        UpgradeHandler,
    >,
> {
    HttpFlow::new(
        fn_service(|_: Request| async {
            Ok::<_, Error>(Response::with_body(StatusCode::OK, "ok"))
        }),
        ExpectHandler,
        None,
    )
}

fn buffer_capacities<T, S, B, X, U>(dispatcher: &Dispatcher<T, S, B, X, U>) -> (usize, usize)
where
    S: Service<Request>,
    S::Error: Into<Response<BoxBody>>,
    B: MessageBody,
    X: Service<Request, Response = Request>,
    X::Error: Into<Response<BoxBody>>,
    U: Service<(Request, Framed<T, Codec>), Response = ()>,
    U::Error: fmt::Display,
{
    let DispatcherState::Normal { inner } = &dispatcher.inner else {
        panic!("not an HTTP/1 dispatcher")
    };
    (inner.read_buf.capacity(), inner.write_buf.capacity())
}

fn responses(buf: &TestBuffer) -> usize {
    let written = buf.take_write_buf();
    memchr::memmem::find_iter(&written, b"HTTP/1.1 200 OK").count()
}

#[actix_rt::test]
async fn an_idle_keep_alive_connection_holds_no_buffer() {
    let mut buf = TestBuffer::new(GET);
    let h1 = Dispatcher::new(
        buf.clone(),
        ok_flow(),
        ServiceConfig::default(),
        None,
        OnConnectData::default(),
    );
    let mut h1 = pin!(h1);

    lazy(|cx| {
        assert!(h1.as_mut().poll(cx).is_pending());
        assert_eq!(responses(&buf), 1);
        // Upstream kept 8 KiB in each for as long as the connection lived.
        assert_eq!(buffer_capacities(&h1), (0, 0));

        // The next request is read and answered in the buffers the first gave back.
        buf.extend_read_buf(GET);
        assert!(h1.as_mut().poll(cx).is_pending());
        assert_eq!(responses(&buf), 1);
        assert_eq!(buffer_capacities(&h1), (0, 0));

        let stats = buffer_pool::stats();
        assert_eq!((stats.allocated, stats.free, stats.lent), (2, 2, 0));
    })
    .await;
}

#[actix_rt::test]
async fn many_connections_served_in_turn_share_two_buffers() {
    let mut conns = Vec::new();
    for _ in 0..100 {
        let buf = TestBuffer::new(GET);
        let h1 = Box::pin(Dispatcher::new(
            buf.clone(),
            ok_flow(),
            ServiceConfig::default(),
            None,
            OnConnectData::default(),
        ));
        conns.push((buf, h1));
    }

    lazy(|cx| {
        for (buf, h1) in &mut conns {
            assert!(h1.as_mut().poll(cx).is_pending());
            assert_eq!(responses(buf), 1);
        }
        for (_, h1) in &conns {
            assert_eq!(buffer_capacities(h1), (0, 0));
        }

        let stats = buffer_pool::stats();
        assert_eq!((stats.allocated, stats.free, stats.lent), (2, 2, 0));
    })
    .await;
}

#[actix_rt::test]
async fn a_request_waiting_for_its_service_holds_no_buffer() {
    let answer = Rc::new(RefCell::new(None::<oneshot::Sender<()>>));
    let flow = {
        let answer = answer.clone();
        HttpFlow::new(
            fn_service(move |_: Request| {
                let (tx, rx) = oneshot::channel();
                *answer.borrow_mut() = Some(tx);
                async move {
                    let _ = rx.await;
                    Ok::<_, Error>(Response::with_body(StatusCode::OK, "ok"))
                }
            }),
            ExpectHandler,
            None::<UpgradeHandler>,
        )
    };
    let buf = TestBuffer::new(GET);
    let h1 = Dispatcher::new(
        buf.clone(),
        flow,
        ServiceConfig::default(),
        None,
        OnConnectData::default(),
    );
    let mut h1 = pin!(h1);

    lazy(|cx| {
        assert!(h1.as_mut().poll(cx).is_pending());
        assert_eq!(responses(&buf), 0);
        assert_eq!(buffer_capacities(&h1), (0, 0));
        assert_eq!(buffer_pool::stats().lent, 0);
    })
    .await;

    answer.borrow_mut().take().unwrap().send(()).unwrap();
    lazy(|cx| {
        assert!(h1.as_mut().poll(cx).is_pending());
        assert_eq!(responses(&buf), 1);
        assert_eq!(buffer_capacities(&h1), (0, 0));
    })
    .await;
}

#[actix_rt::test]
async fn a_partial_head_keeps_its_buffer_until_it_is_complete() {
    let mut buf = TestBuffer::new("GET / HTTP/1.1\r\nHost: loc");
    let h1 = Dispatcher::new(
        buf.clone(),
        ok_flow(),
        ServiceConfig::default(),
        None,
        OnConnectData::default(),
    );
    let mut h1 = pin!(h1);

    lazy(|cx| {
        assert!(h1.as_mut().poll(cx).is_pending());
        assert_eq!(responses(&buf), 0);
        let (read, write) = buffer_capacities(&h1);
        assert!(read > 0, "the start of the head waits in the read buffer");
        assert_eq!(write, 0);

        buf.extend_read_buf("alhost\r\n\r\n");
        assert!(h1.as_mut().poll(cx).is_pending());
        assert_eq!(responses(&buf), 1);
        assert_eq!(buffer_capacities(&h1), (0, 0));
    })
    .await;
}

#[actix_rt::test]
async fn pipelined_requests_are_all_answered_before_the_buffers_go_back() {
    let buf = TestBuffer::new(GET.repeat(3).as_str());
    let h1 = Dispatcher::new(
        buf.clone(),
        ok_flow(),
        ServiceConfig::default(),
        None,
        OnConnectData::default(),
    );
    let mut h1 = pin!(h1);

    lazy(|cx| {
        assert!(h1.as_mut().poll(cx).is_pending());
        assert_eq!(responses(&buf), 3);
        assert_eq!(buffer_capacities(&h1), (0, 0));
        assert_eq!(buffer_pool::stats().lent, 0);
    })
    .await;
}

#[actix_rt::test]
async fn a_closed_connection_gives_its_buffers_back() {
    let buf = TestBuffer::new("GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let h1 = Dispatcher::new(
        buf.clone(),
        ok_flow(),
        ServiceConfig::default(),
        None,
        OnConnectData::default(),
    );
    let mut h1 = pin!(h1);

    lazy(|cx| {
        assert!(matches!(h1.as_mut().poll(cx), Poll::Ready(Ok(()))));
        assert_eq!(responses(&buf), 1);
        let stats = buffer_pool::stats();
        assert_eq!((stats.free, stats.lent), (2, 0));
    })
    .await;
}
