//! A worker that goes quiet gives back the pages a burst left empty (src/allocator.rs,
//! `give_back`): mimalloc itself purges only from inside its own calls, so without the task
//! a quiet thread keeps them. A test binary of its own: RSS is the process's, and no other
//! test may move it meanwhile.

use std::time::{Duration, Instant};

use roundabout::allocator::give_back;

/// The process's resident memory, in bytes.
fn rss() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .unwrap();
    kib << 10
}

#[test]
fn a_quiet_thread_gives_back_the_pages_a_burst_left_empty() {
    std::thread::spawn(|| {
        actix_rt::System::new().block_on(async {
            // 32 MiB in small blocks, as a burst of requests leaves them: pages of this
            // thread's heap, not blocks mapped on their own.
            let burst: Vec<Box<[u8; 512]>> = (0..65_536).map(|_| Box::new([7u8; 512])).collect();
            let during = rss();
            drop(burst);
            let freed = rss();
            assert!(
                freed + (16 << 20) > during,
                "mimalloc gave back {} MiB at once: the test needs it to wait",
                (during - freed) >> 20
            );

            actix_rt::spawn(give_back());
            let start = Instant::now();
            let mut now = rss();
            while now + (16 << 20) > freed && start.elapsed() < Duration::from_secs(5) {
                actix_rt::time::sleep(Duration::from_millis(50)).await;
                now = rss();
            }
            assert!(
                now + (16 << 20) <= freed,
                "RSS {} MiB -> {} MiB after {:?}",
                freed >> 20,
                now >> 20,
                start.elapsed()
            );
        })
    })
    .join()
    .unwrap();
}
