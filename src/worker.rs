//! The one loop of the node's background workers (case assembly, delivery):
//! run a step, then sleep until the step's next deadline, a wake-up or the
//! poll interval, whichever comes first, until shutdown. It owns the timing
//! only; what a step does (and its database) belongs to the worker.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;

/// When a worker looks again.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// The longest sleep without a look (operator commands are seen then).
    pub poll: Duration,
    /// After a wake-up, wait until wake-ups have been quiet for `.0` (but
    /// never longer than `.1` after the first) and take the burst in one
    /// step; `None` steps at once on each wake-up.
    pub coalesce: Option<(Duration, Duration)>,
}

/// Run `step` until `shutdown`. Each step returns the earliest instant (on
/// `clock`) at which it has more to do, if any. Interest in `wake` is
/// registered before each step, so a wake-up during the step still starts
/// the next one.
pub async fn run_worker<F, Fut>(
    wake: Arc<Notify>,
    timing: Timing,
    clock: &Clock,
    shutdown: CancellationToken,
    mut step: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<OffsetDateTime>>,
{
    loop {
        let notified = wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let next = step().await;
        let sleep = match next {
            Some(at) => {
                let until = at - clock.now();
                if until.is_positive() {
                    timing.poll.min(until.unsigned_abs())
                } else {
                    Duration::ZERO
                }
            }
            None => timing.poll,
        };
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep(sleep) => continue,
            _ = shutdown.cancelled() => return,
        }
        let Some((quiet, max)) = timing.coalesce else {
            continue;
        };
        let give_up = tokio::time::Instant::now() + max;
        loop {
            let more = wake.notified();
            tokio::select! {
                _ = more => {
                    if tokio::time::Instant::now() >= give_up {
                        break;
                    }
                }
                _ = tokio::time::sleep(quiet) => break,
                _ = shutdown.cancelled() => return,
            }
        }
    }
}
