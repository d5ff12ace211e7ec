//! Accept loops that survive running out of file descriptors and bound
//! what clients can hold: an accept error (EMFILE, ENFILE, ECONNABORTED,
//! ...) is logged and retried after a pause that doubles up to a second,
//! so the loop neither spins nor stops for good and recovers as soon as
//! descriptors free up; and at most a set number of connections are open
//! at once (the next ones wait in the kernel's backlog).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

const FIRST_PAUSE: Duration = Duration::from_millis(5);
const LONGEST_PAUSE: Duration = Duration::from_secs(1);

/// Accepts the next connection, waiting out errors.
pub async fn accept(listener: &TcpListener, name: &str) -> TcpStream {
    let mut pause = FIRST_PAUSE;
    loop {
        match listener.accept().await {
            Ok((socket, _)) => return socket,
            Err(e) => {
                tracing::warn!(
                    listener = name,
                    error = %e,
                    retry_ms = pause.as_millis() as u64,
                    "accept failed"
                );
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(LONGEST_PAUSE);
            }
        }
    }
}

/// A connection that holds one of the listener's connection permits
/// until it closes.
pub struct Counted {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
}

/// The connections of `listener` as a stream for tonic (which would retry
/// a failing accept at once, forever), at most `limit` open at a time.
/// Ends when the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    name: &'static str,
    limit: usize,
) -> ReceiverStream<Result<Counted, std::io::Error>> {
    let (tx, rx) = mpsc::channel(16);
    let permits = Arc::new(Semaphore::new(limit.max(1)));
    tokio::spawn(async move {
        loop {
            let next = async {
                let permit = permits.clone().acquire_owned().await.ok()?;
                let stream = accept(&listener, name).await;
                // Small writes (streamed tokens) go out at once.
                let _ = stream.set_nodelay(true);
                Some(Counted {
                    stream,
                    _permit: permit,
                })
            };
            let connection = tokio::select! {
                connection = next => connection,
                _ = tx.closed() => return,
            };
            let Some(connection) = connection else {
                return;
            };
            if tx.send(Ok(connection)).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

impl Connected for Counted {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
