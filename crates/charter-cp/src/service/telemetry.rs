//! Telemetry group commit: reports from many data planes that arrive together share one
//! durable store write. One task takes the first waiting report, then every other report
//! already waiting (up to [`MAX_BATCH`]), applies them in one `Store::apply_telemetry`,
//! and answers each. While a write is on the disk, new reports queue for the next one, so
//! the batch grows with the load and a lone report waits for nobody.

use std::sync::Arc;

use charter_store::{Report, Store};
use tokio::sync::{mpsc, oneshot, watch};

/// The most reports in one write.
const MAX_BATCH: usize = 4096;
/// Reports waiting beyond this make their senders wait (back-pressure on the streams).
const QUEUE: usize = 16 * 1024;

/// A report could not be made durable; the data plane sends it again.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct TelemetryError(String);

type Pending = (Report, oneshot::Sender<Result<bool, TelemetryError>>);

/// Hands reports to the task.
pub(super) struct Sender(mpsc::Sender<Pending>);

/// The task's end of the queue.
pub(super) type Receiver = mpsc::Receiver<Pending>;

pub(super) fn channel() -> (Sender, Receiver) {
    let (tx, rx) = mpsc::channel(QUEUE);
    (Sender(tx), rx)
}

impl Sender {
    /// Queues a report and waits until it is durable (or failed).
    pub(super) async fn apply(&self, report: Report) -> Result<bool, TelemetryError> {
        let (tx, rx) = oneshot::channel();
        self.0
            .send((report, tx))
            .await
            .map_err(|_| TelemetryError("the control plane is shutting down".to_owned()))?;
        rx.await
            .map_err(|_| TelemetryError("the control plane is shutting down".to_owned()))?
    }
}

/// Applies queued reports in batches until `shutdown` fires.
pub(super) async fn run(
    store: Arc<dyn Store>,
    mut queue: Receiver,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut batch: Vec<Pending> = Vec::new();
    loop {
        tokio::select! {
            first = queue.recv() => match first {
                Some(first) => batch.push(first),
                None => return,
            },
            _ = shutdown.changed() => return,
        }
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let (reports, answers): (Vec<Report>, Vec<_>) = batch.drain(..).unzip();
        let size = reports.len();
        match store.apply_telemetry(reports).await {
            Ok(applied) => {
                tracing::debug!(reports = size, "telemetry batch durable");
                for (answer, applied) in answers.into_iter().zip(applied) {
                    let _ = answer.send(Ok(applied));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, reports = size, "cannot store telemetry; the data planes will send it again");
                let error = TelemetryError(e.to_string());
                for answer in answers {
                    let _ = answer.send(Err(error.clone()));
                }
            }
        }
    }
}
