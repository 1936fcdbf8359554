//! Decoding a request body: by length or chunked (RFC 9112 §7.1), strictly. Chunk-size
//! lines must end in CRLF, sizes fit in 64 bits, chunk data is followed by CRLF: the
//! lenient variants are where request smuggling lives.

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};

/// What the decoder produced from the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    Data(Bytes),
    Trailers(HeaderMap),
    /// The body is complete.
    End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("invalid chunk size line")]
    Size,
    #[error("chunk data not followed by CRLF")]
    DataEnd,
    #[error("invalid or oversized trailer section")]
    Trailers,
}

/// The longest chunk-size line accepted (size plus extensions).
const MAX_SIZE_LINE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoder {
    Length(u64),
    Chunked(State),
}

impl Decoder {
    pub fn length(n: u64) -> Self {
        Decoder::Length(n)
    }

    pub fn chunked() -> Self {
        Decoder::Chunked(State::Size)
    }

    pub fn is_done(&self) -> bool {
        matches!(self, Decoder::Length(0) | Decoder::Chunked(State::Done))
    }

    /// Takes the next event from the front of `buf`; `Ok(None)` when more bytes are
    /// needed. `max_trailers` bounds the trailer section.
    pub fn decode(
        &mut self,
        buf: &mut BytesMut,
        max_trailers: usize,
    ) -> Result<Option<Event>, ChunkError> {
        loop {
            match self {
                Decoder::Length(0) => return Ok(Some(Event::End)),
                Decoder::Length(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let n = (*left).min(buf.len() as u64);
                    *left -= n;
                    return Ok(Some(Event::Data(buf.split_to(n as usize).freeze())));
                }
                Decoder::Chunked(state) => match *state {
                    State::Done => return Ok(Some(Event::End)),
                    State::Size => {
                        let Some(end) = memchr::memchr(b'\n', buf) else {
                            if buf.len() > MAX_SIZE_LINE {
                                return Err(ChunkError::Size);
                            }
                            return Ok(None);
                        };
                        let size = parse_size_line(&buf[..=end])?;
                        let _ = buf.split_to(end + 1);
                        *state = if size == 0 {
                            State::Trailers
                        } else {
                            State::Data(size)
                        };
                    }
                    State::Data(left) => {
                        if buf.is_empty() {
                            return Ok(None);
                        }
                        let n = left.min(buf.len() as u64);
                        *state = if n == left {
                            State::DataEnd
                        } else {
                            State::Data(left - n)
                        };
                        return Ok(Some(Event::Data(buf.split_to(n as usize).freeze())));
                    }
                    State::DataEnd => {
                        if buf.len() < 2 {
                            return Ok(None);
                        }
                        if &buf[..2] != b"\r\n" {
                            return Err(ChunkError::DataEnd);
                        }
                        let _ = buf.split_to(2);
                        *state = State::Size;
                    }
                    State::Trailers => {
                        if buf.starts_with(b"\r\n") {
                            let _ = buf.split_to(2);
                            *state = State::Done;
                            return Ok(Some(Event::End));
                        }
                        if buf.len() < 2 {
                            return Ok(None);
                        }
                        let Some(end) = memchr::memmem::find(buf, b"\r\n\r\n") else {
                            if buf.len() > max_trailers {
                                return Err(ChunkError::Trailers);
                            }
                            return Ok(None);
                        };
                        if end + 4 > max_trailers {
                            return Err(ChunkError::Trailers);
                        }
                        let section = buf.split_to(end + 4);
                        *state = State::Done;
                        return parse_trailers(&section).map(|t| Some(Event::Trailers(t)));
                    }
                },
            }
        }
    }
}

/// `1a;ext=v\r\n` -> 26. Hex digits, optional whitespace and extensions, CRLF.
fn parse_size_line(line: &[u8]) -> Result<u64, ChunkError> {
    let line = line.strip_suffix(b"\r\n").ok_or(ChunkError::Size)?;
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err(ChunkError::Size);
    }
    let rest = &line[digits..];
    let rest = rest.trim_ascii_start();
    if !(rest.is_empty() || rest[0] == b';') || rest.contains(&b'\r') {
        return Err(ChunkError::Size);
    }
    let mut size = 0u64;
    for &d in &line[..digits] {
        let v = (d as char).to_digit(16).ok_or(ChunkError::Size)?;
        size = (size << 4) | u64::from(v);
    }
    Ok(size)
}

fn parse_trailers(section: &[u8]) -> Result<HeaderMap, ChunkError> {
    let mut raw = [httparse::EMPTY_HEADER; 32];
    let Ok(httparse::Status::Complete((_, fields))) = httparse::parse_headers(section, &mut raw)
    else {
        return Err(ChunkError::Trailers);
    };
    let mut map = HeaderMap::with_capacity(fields.len());
    for f in fields {
        let name = HeaderName::from_bytes(f.name.as_bytes()).map_err(|_| ChunkError::Trailers)?;
        let value = HeaderValue::from_bytes(f.value).map_err(|_| ChunkError::Trailers)?;
        map.append(name, value);
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `input` fed in pieces of `step` bytes; returns the body and trailers.
    fn run(input: &[u8], step: usize) -> Result<(Vec<u8>, Option<HeaderMap>, usize), ChunkError> {
        let mut d = Decoder::chunked();
        let mut buf = BytesMut::new();
        let (mut body, mut trailers) = (Vec::new(), None);
        let mut fed = 0;
        loop {
            match d.decode(&mut buf, 1024)? {
                Some(Event::Data(b)) => body.extend_from_slice(&b),
                Some(Event::Trailers(t)) => trailers = Some(t),
                Some(Event::End) => return Ok((body, trailers, buf.len())),
                None => {
                    assert!(fed < input.len(), "decoder wants more than the input");
                    let end = (fed + step).min(input.len());
                    buf.extend_from_slice(&input[fed..end]);
                    fed = end;
                }
            }
        }
    }

    #[test]
    fn decodes_chunks_fed_whole_or_byte_by_byte() {
        let input = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\nGET /next";
        for step in [1, 2, 7, input.len()] {
            let (body, trailers, _) = run(input, step).unwrap();
            assert_eq!(body, b"hello world");
            assert!(trailers.is_none());
        }
        let (_, _, left) = run(input, input.len()).unwrap();
        assert_eq!(left, b"GET /next".len());
    }

    #[test]
    fn decodes_trailers() {
        let input = b"3\r\nabc\r\n0\r\ngrpc-status: 0\r\nx-t: 1\r\n\r\n";
        for step in [1, input.len()] {
            let (body, trailers, _) = run(input, step).unwrap();
            assert_eq!(body, b"abc");
            let t = trailers.unwrap();
            assert_eq!(t["grpc-status"], "0");
            assert_eq!(t["x-t"], "1");
        }
    }

    #[test]
    fn refuses_lenient_framing() {
        for bad in [
            &b"5\nhello\r\n0\r\n\r\n"[..], // bare LF after the size
            b"5\r\nhelloXX0\r\n\r\n",      // no CRLF after the data
            b"x\r\n",                      // no digits
            b"11111111111111111\r\n",      // 17 hex digits: overflow
            b"5 x\r\nhello\r\n",           // junk after the size
            b"-5\r\n",
        ] {
            assert!(
                run(bad, bad.len()).is_err(),
                "{:?} was accepted",
                String::from_utf8_lossy(bad)
            );
        }
        let long = [b'a'; MAX_SIZE_LINE + 10];
        assert_eq!(run(&long, long.len()).err(), Some(ChunkError::Size));
    }

    #[test]
    fn length_bodies_stop_at_their_length() {
        let mut d = Decoder::length(5);
        let mut buf = BytesMut::from(&b"hel"[..]);
        assert_eq!(
            d.decode(&mut buf, 0).unwrap(),
            Some(Event::Data(Bytes::from_static(b"hel")))
        );
        assert_eq!(d.decode(&mut buf, 0).unwrap(), None);
        buf.extend_from_slice(b"loGET /");
        assert_eq!(
            d.decode(&mut buf, 0).unwrap(),
            Some(Event::Data(Bytes::from_static(b"lo")))
        );
        assert_eq!(d.decode(&mut buf, 0).unwrap(), Some(Event::End));
        assert_eq!(&buf[..], b"GET /");
        assert!(d.is_done());
    }
}
