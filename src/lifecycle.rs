//! The process's life: [`run`] starts the balancer and answers signals until it stops
//! (SIGTERM, SIGINT) or hands its listeners to a new process (SIGUSR2); SIGHUP reloads the
//! configuration, SIGUSR1 reopens the access log. The balancer itself is [`crate::start`]'s.

use std::io;

use crate::{config::Config, reload, start_with, upgrade, Inherited, SHUTDOWN_TIMEOUT};

/// Runs the balancer until SIGTERM or SIGINT, then stops gracefully, serving on the sockets
/// `inherited` hands over where they match. SIGHUP reloads the configuration file; SIGUSR1
/// reopens the access log; SIGUSR2 starts the executable again, hands it the listeners and,
/// once it serves, drains and returns.
pub async fn run(config: Config, mut inherited: Inherited) -> io::Result<()> {
    // Before the listeners: a SIGHUP that finds the port open must not find its default
    // action (the end of the process) still in place.
    let mut signals = reload::Signals::new()?;
    // At start: the path this process was started from, before anything replaces it.
    let exec = upgrade::Exec::current();
    let mut notify = std::mem::take(&mut inherited.notify);
    let running = match start_with(config, inherited) {
        Ok(running) => running,
        Err(e) => {
            notify.fail(&e.to_string());
            return Err(e);
        }
    };
    notify.ready();
    let mut successor = None;
    let handed_over = loop {
        let upgrading = async {
            match &mut successor {
                Some(s) => s.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            signal = signals.next() => match signal {
                reload::Signal::Stop => break false,
                reload::Signal::Reload => {
                    let _ = running.reload("SIGHUP").await;
                }
                reload::Signal::ReopenLogs => running.reopen_logs(),
                reload::Signal::Upgrade if successor.is_some() => {
                    log::warn!("upgrade (SIGUSR2): one is under way already; this signal is ignored");
                }
                reload::Signal::Upgrade => match running.upgrade(&exec) {
                    Ok(started) => successor = Some(Box::pin(started)),
                    Err(e) => log::error!("upgrade (SIGUSR2) failed: {e}; this process keeps serving"),
                },
            },
            done = upgrading => {
                successor = None;
                match done {
                    Ok(pid) => {
                        log::info!(
                            "upgrade (SIGUSR2): process {pid} serves; this one accepts no more \
                             connections and finishes its requests (up to {}s)",
                            SHUTDOWN_TIMEOUT.as_secs()
                        );
                        break true;
                    }
                    Err(why) => log::error!(
                        "upgrade (SIGUSR2) failed: the new process {why}; this process keeps serving"
                    ),
                }
            }
        }
    };
    notify.stopping();
    if handed_over {
        running.hand_over().await;
    } else {
        log::info!(
            "stopping: no new connections; waiting up to {}s for in-flight requests",
            SHUTDOWN_TIMEOUT.as_secs()
        );
        running.stop(true).await;
    }
    log::info!("stopped");
    Ok(())
}
