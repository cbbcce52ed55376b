//! A bare HTTP/2 client over cleartext TCP (prior knowledge), for tests that need what no
//! ordinary client does: streams opened and never finished, the server's SETTINGS as sent, and
//! each frame it answers with. Header blocks are written with HPACK literals only (no Huffman,
//! no dynamic table), which every decoder takes.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const ACK: u8 = 0x1;
pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
pub const REFUSED_STREAM: u32 = 0x7;
pub const CANCEL: u32 = 0x8;

#[derive(Debug)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

pub struct H2 {
    stream: TcpStream,
    buffered: Vec<u8>,
    /// The server's first SETTINGS frame: (identifier, value) pairs.
    pub settings: Vec<(u16, u32)>,
    /// The server closed the connection (or it failed): a `None` from
    /// [`H2::read_frame_until`] is that, not its deadline.
    pub closed: bool,
}

impl H2 {
    /// Connects, sends the preface and empty SETTINGS, and waits for the server's SETTINGS
    /// (acknowledged).
    pub async fn connect(port: u16) -> Self {
        Self::connect_with(port, &[]).await
    }

    /// [`H2::connect`], announcing `settings` (identifier, value) of this client's own.
    pub async fn connect_with(port: u16, settings: &[(u16, u32)]) -> Self {
        let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut h2 = Self {
            stream,
            buffered: Vec::new(),
            settings: Vec::new(),
            closed: false,
        };
        h2.stream.write_all(PREFACE).await.unwrap();
        let ours: Vec<u8> = settings
            .iter()
            .flat_map(|(id, value)| [id.to_be_bytes().as_slice(), &value.to_be_bytes()].concat())
            .collect();
        h2.write_frame(SETTINGS, 0, 0, &ours).await;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let frame = h2
                .read_frame_until(deadline)
                .await
                .expect("the server's SETTINGS within 5 s");
            if frame.kind == SETTINGS && frame.flags & ACK == 0 {
                h2.settings = frame
                    .payload
                    .chunks_exact(6)
                    .map(|entry| {
                        let id = u16::from_be_bytes([entry[0], entry[1]]);
                        let value = u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]);
                        (id, value)
                    })
                    .collect();
                h2.write_frame(SETTINGS, ACK, 0, &[]).await;
                return h2;
            }
        }
    }

    /// The value the server sent for `id`, if any.
    pub fn setting(&self, id: u16) -> Option<u32> {
        self.settings
            .iter()
            .find(|(setting, _)| *setting == id)
            .map(|(_, value)| *value)
    }

    pub async fn write_frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        self.stream
            .write_all(&frame(kind, flags, stream, payload))
            .await
            .unwrap();
    }

    /// Writes frames made with [`frame`] and [`request_frame`] in one write: the server reads
    /// them together.
    pub async fn write_frames(&mut self, frames: &[Vec<u8>]) {
        self.stream.write_all(&frames.concat()).await.unwrap();
    }

    /// Opens `stream` with a request head; `END_STREAM` when `finished`.
    pub async fn request(
        &mut self,
        stream: u32,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        finished: bool,
    ) {
        let block = header_block(method, path, headers);
        let flags = END_HEADERS | if finished { END_STREAM } else { 0 };
        self.write_frame(HEADERS, flags, stream, &block).await;
    }

    /// The next frame, or `None` at `deadline` or when the server closed the connection
    /// ([`H2::closed`]).
    pub async fn read_frame_until(&mut self, deadline: Instant) -> Option<Frame> {
        loop {
            if self.buffered.len() >= 9 {
                let length =
                    u32::from_be_bytes([0, self.buffered[0], self.buffered[1], self.buffered[2]])
                        as usize;
                if self.buffered.len() >= 9 + length {
                    let frame: Vec<u8> = self.buffered.drain(..9 + length).collect();
                    return Some(Frame {
                        kind: frame[3],
                        flags: frame[4],
                        stream: u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]])
                            & 0x7fff_ffff,
                        payload: frame[9..].to_vec(),
                    });
                }
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            let mut buf = [0u8; 16 * 1024];
            match tokio::time::timeout(left, self.stream.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => self.buffered.extend_from_slice(&buf[..n]),
                Ok(_) => {
                    self.closed = true;
                    return None;
                }
                Err(_) => return None,
            }
        }
    }
}

/// A frame's bytes.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let length = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut frame = Vec::with_capacity(9 + payload.len());
    frame.extend_from_slice(&length[1..]);
    frame.extend_from_slice(&[kind, flags]);
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// The bytes of a request with no body on `stream`: its HEADERS frame, `END_STREAM` set.
pub fn request_frame(stream: u32, method: &str, path: &str) -> Vec<u8> {
    frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        stream,
        &header_block(method, path, &[]),
    )
}

/// An HPACK block: `:method`, `:scheme` from the static table, the rest as literals without
/// indexing.
fn header_block(method: &str, path: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut block = Vec::new();
    match method {
        "GET" => block.push(0x82),
        "POST" => block.push(0x83),
        // Literal without indexing, indexed name :method (2).
        other => {
            block.push(0x02);
            push_string(&mut block, other);
        }
    }
    block.push(0x86); // :scheme http
    // Literal without indexing, indexed name: :path (4), :authority (1).
    block.push(0x04);
    push_string(&mut block, path);
    block.push(0x01);
    push_string(&mut block, "127.0.0.1");
    for (name, value) in headers {
        block.push(0x00);
        push_string(&mut block, name);
        push_string(&mut block, value);
    }
    block
}

/// A string literal, not Huffman-coded: its length as an HPACK integer with a 7-bit prefix.
fn push_string(block: &mut Vec<u8>, text: &str) {
    let mut length = text.len();
    if length < 0x7f {
        block.push(length as u8);
    } else {
        block.push(0x7f);
        length -= 0x7f;
        while length >= 0x80 {
            block.push((length % 0x80) as u8 | 0x80);
            length /= 0x80;
        }
        block.push(length as u8);
    }
    block.extend_from_slice(text.as_bytes());
}
