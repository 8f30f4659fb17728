//! The Kafka front: the Kafka wire protocol on port 9092, a client of the broker API only.
//!
//! Each connection is one task. Frames are cut by [`codec::FrameDecoder`] (length checked
//! before allocating); each request is decoded and handled (`handlers.rs`) concurrently with
//! the next ones, and the responses are written in request order, as the protocol requires
//! (clients pipeline requests on one connection). A connection that sends nothing for the
//! idle deadline, or takes longer than the request deadline to send one frame, is closed; a
//! malformed frame closes its connection only. Requests for an API or version not served
//! get an `UNSUPPORTED_VERSION` answer before the connection closes, except ApiVersions: its
//! answer lists the versions served and the client asks again on the same connection.
//!
//! Where to start: [`KafkaFront::serve`], then `handlers.rs` (one function per API).

pub mod codec;
mod groups;
mod handlers;
pub mod schema;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::broker::groups::Coordinator;
use codec::{Decoded, FrameDecoder};

/// Settings of the Kafka front.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// Largest request frame accepted (Kafka's `socket.request.max.bytes`).
    pub max_frame_bytes: usize,
    /// A connection with no request in flight that sends nothing for this long is closed
    /// (Kafka's `connections.max.idle.ms`).
    pub idle_timeout: Duration,
    /// Longest a client may take to send one whole frame once it started.
    pub request_timeout: Duration,
    /// Requests handled at once per connection; reading pauses beyond.
    pub max_in_flight: usize,
}

/// The Kafka listener of one node.
#[derive(Debug)]
pub struct KafkaFront {
    listener: TcpListener,
    coordinator: Coordinator,
    settings: Arc<KafkaSettings>,
}

impl KafkaFront {
    /// Binds the listener.
    /// Binds the listener; requests are served by the broker behind `coordinator` (which
    /// also answers the group APIs).
    pub async fn bind(
        addr: SocketAddr,
        coordinator: Coordinator,
        settings: KafkaSettings,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        Ok(Self {
            listener,
            coordinator,
            settings: Arc::new(settings),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts connections until `stop` resolves.
    pub async fn serve(self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => return,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        let conn = Connection {
                            coordinator: self.coordinator.clone(),
                            settings: Arc::clone(&self.settings),
                            peer,
                        };
                        tokio::spawn(conn.run(stream));
                    }
                    Err(e) => {
                        tracing::warn!(err = %e, "kafka: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
    }
}

/// A request being handled.
type InFlight = std::pin::Pin<Box<dyn std::future::Future<Output = Reply> + Send>>;

/// One client connection.
struct Connection {
    coordinator: Coordinator,
    settings: Arc<KafkaSettings>,
    peer: SocketAddr,
}

/// What handling one request produced.
pub(crate) enum Reply {
    /// A response frame.
    Frame(Bytes),
    /// Nothing to send (produce with acks=0).
    None,
    /// A last frame, then close the connection.
    Close(Bytes),
}

impl Connection {
    async fn run(self, stream: TcpStream) {
        let (mut rd, mut wr) = stream.into_split();
        let mut frames = FrameDecoder::new(self.settings.max_frame_bytes);
        let mut in_flight: FuturesOrdered<InFlight> = FuturesOrdered::new();
        let mut last_read = Instant::now();
        let mut frame_started: Option<Instant> = None;
        let mut closing = false;
        let handlers = handlers::Handlers::new(self.coordinator.clone(), self.peer);
        loop {
            // Frames already buffered first.
            if !closing && in_flight.len() < self.settings.max_in_flight {
                match frames.next_frame() {
                    Ok(Some(frame)) => {
                        frame_started = frames.in_frame().then(Instant::now);
                        match codec::decode(frame) {
                            Ok(Decoded::Request(req)) => {
                                let h = handlers.clone();
                                in_flight.push_back(Box::pin(async move { h.handle(*req).await }));
                            }
                            Ok(Decoded::Unsupported(p)) => {
                                tracing::debug!(
                                    peer = %self.peer,
                                    api_key = p.api_key,
                                    version = p.api_version,
                                    "kafka: unsupported API or version"
                                );
                                let reply = codec::unsupported_version(p);
                                // A client whose ApiVersions version is too new retries with
                                // an older one on the same connection (KIP-511); anything
                                // else unsupported ends the connection after the answer.
                                if p.api_key == kafka_protocol::messages::ApiKey::ApiVersions as i16
                                {
                                    in_flight
                                        .push_back(Box::pin(async move { Reply::Frame(reply) }));
                                } else {
                                    in_flight
                                        .push_back(Box::pin(async move { Reply::Close(reply) }));
                                    closing = true;
                                }
                            }
                            Err(why) => {
                                tracing::info!(peer = %self.peer, %why, "kafka: malformed request; closing");
                                closing = true;
                            }
                        }
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::info!(peer = %self.peer, err = %e, "kafka: bad frame; closing");
                        closing = true;
                    }
                }
            }
            if closing && in_flight.is_empty() {
                break;
            }
            let deadline = match frame_started {
                Some(t) => t + self.settings.request_timeout,
                None => last_read + self.settings.idle_timeout,
            };
            let reading = !closing && in_flight.len() < self.settings.max_in_flight;
            tokio::select! {
                read = rd.read_buf(frames.buffer()), if reading => match read {
                    Ok(0) | Err(_) => {
                        closing = true;
                        // What is in flight is still answered, in case the peer only shut
                        // its sending side.
                    }
                    Ok(_) => {
                        last_read = Instant::now();
                        if frame_started.is_none() && frames.in_frame() {
                            frame_started = Some(last_read);
                        }
                    }
                },
                Some(reply) = in_flight.next(), if !in_flight.is_empty() => {
                    let (bytes, close) = match reply {
                        Reply::Frame(b) => (Some(b), false),
                        Reply::None => (None, false),
                        Reply::Close(b) => (Some(b), true),
                    };
                    if let Some(b) = bytes
                        && wr.write_all(&b).await.is_err()
                    {
                        break;
                    }
                    if close {
                        break;
                    }
                    last_read = Instant::now();
                }
                () = tokio::time::sleep_until(deadline), if in_flight.is_empty() => {
                    tracing::debug!(peer = %self.peer, "kafka: connection idle or frame too slow; closing");
                    break;
                }
            }
        }
        let _ = wr.shutdown().await;
    }
}
