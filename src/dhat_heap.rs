//! Heap profiling of the binary, only with `--features dhat-heap` (issue #27: what still
//! grows under `bench/soak`). The `dhat` crate becomes the global allocator: every
//! allocation is recorded with its backtrace, and the profile says, per allocation site,
//! how many bytes are live at the moment it is written.
//!
//! dhat writes its profile when its `Profiler` is dropped, which would be at the end of
//! `main`, after the actors (and so whatever they hold) are gone. To read what is live
//! while the balancer runs, the profile is written `ROUNDABOUT_DHAT_AFTER` seconds after
//! start instead, from a thread of its own, while the process goes on; one process gives
//! one moment, so two moments are two runs (`bench/soak` with `DHAT=1`). Meanwhile the
//! thread prints the live bytes every minute, so the run's curve is there too.
//!
//! Environment: `ROUNDABOUT_DHAT_AFTER` (seconds; without it, at exit),
//! `ROUNDABOUT_DHAT_FILE` (default `dhat-heap.json`).

use std::{
    path::PathBuf,
    sync::Mutex,
    time::{Duration, Instant},
};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

/// Frames kept per allocation site: an allocation deep in actix-http or awc is otherwise
/// cut off before the roundabout frame that made it (dhat keeps 10 by default).
const FRAMES: usize = 48;

/// How often the live bytes are printed.
const EVERY: Duration = Duration::from_secs(60);

/// The running profiler, shared by `main` and the sampling thread: dhat panics when asked
/// for its counts once its profiler is gone, so whoever drops it does so under this lock.
static PROFILER: Mutex<Option<dhat::Profiler>> = Mutex::new(None);

/// Held by `main`: when dropped, the profile is written (unless it was already).
pub struct Profiling;

impl Drop for Profiling {
    fn drop(&mut self) {
        drop(PROFILER.lock().unwrap_or_else(|e| e.into_inner()).take());
    }
}

/// Starts profiling; the live bytes are printed every minute from a thread of its own,
/// which writes the profile at `ROUNDABOUT_DHAT_AFTER` seconds when it is set. Otherwise
/// it is written when the result is dropped, at the end of `main`.
pub fn start() -> Profiling {
    let file = std::env::var_os("ROUNDABOUT_DHAT_FILE")
        .map_or_else(|| PathBuf::from("dhat-heap.json"), PathBuf::from);
    let after = std::env::var("ROUNDABOUT_DHAT_AFTER")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs);
    let profiler = dhat::Profiler::builder()
        .file_name(file)
        .trim_backtraces(Some(FRAMES))
        .build();
    *PROFILER.lock().unwrap_or_else(|e| e.into_inner()) = Some(profiler);
    let started = Instant::now();
    std::thread::Builder::new()
        .name("dhat".into())
        .spawn(move || sample(started, after))
        .expect("a thread for the heap samples");
    Profiling
}

/// Prints the live heap every [`EVERY`], and writes the profile at `after` (dhat counts
/// nothing after that); stops once the profiler is gone.
fn sample(started: Instant, after: Option<Duration>) {
    let mut next = EVERY;
    loop {
        let due = after.map_or(next, |after| next.min(after));
        std::thread::sleep(due.saturating_sub(started.elapsed()));
        let mut profiler = PROFILER.lock().unwrap_or_else(|e| e.into_inner());
        if profiler.is_none() {
            return;
        }
        let stats = dhat::HeapStats::get();
        eprintln!(
            "dhat-heap: t={} s live {} bytes in {} blocks ({} bytes allocated in all)",
            started.elapsed().as_secs(),
            stats.curr_bytes,
            stats.curr_blocks,
            stats.total_bytes
        );
        if after == Some(due) {
            // Writing resolves every backtrace with the allocator's lock held: the process
            // stands still meanwhile (seconds to a minute).
            drop(profiler.take());
            return;
        }
        next += EVERY;
    }
}
