//! `roundabout_heap_bytes{state}`: the live heap as the allocator counts it, read at each
//! scrape. A test binary of its own, so that no other test's balancer moves the process's
//! heap while this one reads it.

mod common;

use common::*;

/// The `in_use` and `free` values of `roundabout_heap_bytes` at a scrape of `lb`.
async fn scrape(lb: &roundabout::Running) -> (u64, u64) {
    let text = metrics_of(lb).await;
    let value = |state: &str| {
        metric(
            &text,
            &format!("roundabout_heap_bytes{{state=\"{state}\"}} "),
        ) as u64
    };
    (value("in_use"), value("free"))
}

/// The balancer runs in this process, so the test's own block is its heap too: a block the
/// process holds shows in `in_use`, and leaves it once freed.
#[actix_rt::test]
async fn heap_bytes_follow_what_the_process_holds() {
    let a = Backend::start("a");
    let lb = balancer(&urls(&[&a]), "");
    let (base, _) = scrape(&lb).await;
    assert!(base > 0);

    // 64 MiB, written so that it is really there: far more than the scrapes themselves take
    // or give back meanwhile.
    let block = vec![7u8; 64 << 20];
    let (during, _) = scrape(&lb).await;
    assert!(during >= base + (48 << 20), "{base} -> {during}");
    drop(block);
    let (after, _) = scrape(&lb).await;
    assert!(
        after < base + (16 << 20),
        "{base} -> {during} -> {after} freed"
    );
}
