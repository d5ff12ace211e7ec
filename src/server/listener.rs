//! Accept loops that survive running out of file descriptors: an accept
//! error (EMFILE, ENFILE, ECONNABORTED, ...) is logged and retried after a
//! pause that doubles up to a second, so the loop neither spins nor stops
//! for good, and it recovers as soon as descriptors free up.

use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const FIRST_PAUSE: Duration = Duration::from_millis(5);
const LONGEST_PAUSE: Duration = Duration::from_secs(1);

/// Accepts the next connection, waiting out errors.
pub async fn accept(listener: &TcpListener, name: &str) -> TcpStream {
    let mut pause = FIRST_PAUSE;
    loop {
        match listener.accept().await {
            Ok((socket, _)) => return socket,
            Err(e) => {
                tracing::warn!(listener = name, error = %e, retry_ms = pause.as_millis() as u64, "accept failed");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(LONGEST_PAUSE);
            }
        }
    }
}

/// The connections of `listener` as a stream for tonic, which would
/// otherwise retry a failing accept at once, forever. Ends when the stream
/// is dropped.
pub fn incoming(
    listener: TcpListener,
    name: &'static str,
) -> ReceiverStream<Result<TcpStream, std::io::Error>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                socket = accept(&listener, name) => {
                    // Small writes (streamed tokens) go out at once.
                    let _ = socket.set_nodelay(true);
                    if tx.send(Ok(socket)).await.is_err() {
                        return;
                    }
                }
                _ = tx.closed() => return,
            }
        }
    });
    ReceiverStream::new(rx)
}
