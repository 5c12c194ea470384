//! Length-delimited protobuf frames, the framing of every libp2p stream we speak: an unsigned
//! varint byte count (exactly what `prost::Message::encode_length_delimited` writes) followed
//! by the message. Timeouts are the caller's business; this layer only bounds memory. Large
//! frames are also timed as they arrive ([`crate::arrival`]), which is how peers learn the rate
//! of their links without sending anything extra.

use std::io::ErrorKind;
use std::time::Instant;

use futures::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use prost::Message;

use crate::arrival::ArrivalMeter;
use crate::WireError;

/// A u64 varint never needs more than 10 bytes (7 payload bits each).
const MAX_VARINT_LEN: usize = 10;

/// Writes one frame and flushes, so the peer sees it now rather than when a buffer fills.
pub async fn write_frame<W, M>(w: &mut W, msg: &M) -> Result<(), WireError>
where
    W: AsyncWrite + Unpin + ?Sized,
    M: Message,
{
    w.write_all(&msg.encode_length_delimited_to_vec()).await?;
    w.flush().await?;
    Ok(())
}

/// Reads one frame of at most `max_len` message bytes.
///
/// `Ok(None)` means the peer closed the stream cleanly between frames; EOF anywhere inside a
/// frame is [`WireError::Truncated`]. The length is checked against `max_len` before the
/// buffer is allocated, so a peer cannot make us reserve more than `max_len` bytes. The prefix
/// is read a byte at a time to never consume bytes of the next frame; give it a buffered
/// reader if the underlying stream makes small reads expensive.
pub async fn read_frame<R, M>(r: &mut R, max_len: usize) -> Result<Option<M>, WireError>
where
    R: AsyncRead + Unpin + ?Sized,
    M: Message + Default,
{
    Ok(read_timed(r, max_len).await?.map(|got| got.frame))
}

/// A frame and, for a large one, the rate its bytes arrived at.
#[derive(Debug)]
pub struct Received<M> {
    pub frame: M,
    /// The sender's link to us in bytes per second, from how the frame's body arrived
    /// ([`crate::arrival`]); `None` for frames too small or too lumped to tell.
    pub rate: Option<u64>,
}

/// [`read_frame`], with the rate the frame's body arrived at.
pub async fn read_timed<R, M>(r: &mut R, max_len: usize) -> Result<Option<Received<M>>, WireError>
where
    R: AsyncRead + Unpin + ?Sized,
    M: Message + Default,
{
    let Some(len) = read_length(r).await? else {
        return Ok(None);
    };
    let len_ok = usize::try_from(len).ok().filter(|&n| n <= max_len);
    let Some(len) = len_ok else {
        return Err(WireError::FrameTooLarge { len, max: max_len });
    };
    let mut buf = vec![0u8; len];
    let mut meter = ArrivalMeter::for_body(len);
    let mut filled = 0;
    while filled < len {
        let n = match r.read(&mut buf[filled..]).await {
            Ok(0) => return Err(WireError::Truncated),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(eof_is_truncation(e)),
        };
        filled += n;
        if let Some(m) = meter.as_mut() {
            m.read(n, Instant::now());
        }
    }
    Ok(Some(Received {
        frame: M::decode(buf.as_slice())?,
        rate: meter.and_then(|m| m.rate()),
    }))
}

/// The frames of `r` as a stream, each at most `max_len` bytes and with its arrival rate.
/// Unlike [`read_frame`], waiting for the next item is cancel-safe (a partly read frame stays
/// in the stream's state), so a reader can wait for this peer and for something else at once
/// and drop the wait. Ends after a clean EOF or the first error, which it yields.
pub fn frames<R, M>(
    r: R,
    max_len: usize,
) -> impl futures::Stream<Item = Result<Received<M>, WireError>>
where
    R: AsyncRead + Unpin,
    M: Message + Default,
{
    futures::stream::unfold(Some(r), move |r| async move {
        let mut r = r?;
        match read_timed::<_, M>(&mut r, max_len).await {
            Ok(Some(f)) => Some((Ok(f), Some(r))),
            Ok(None) => None,
            Err(e) => Some((Err(e), None)),
        }
    })
}

/// Reads the varint length prefix; `None` on EOF before its first byte.
async fn read_length<R>(r: &mut R) -> Result<Option<u64>, WireError>
where
    R: AsyncRead + Unpin + ?Sized,
{
    let mut len = 0u64;
    for i in 0..MAX_VARINT_LEN {
        let mut byte = [0u8];
        match r.read_exact(&mut byte).await {
            Err(e) if i == 0 && e.kind() == ErrorKind::UnexpectedEof => return Ok(None),
            other => other.map_err(eof_is_truncation)?,
        }
        let payload = u64::from(byte[0] & 0x7f);
        // The 10th byte holds only the top bit of a u64; anything more would be dropped.
        if i == MAX_VARINT_LEN - 1 && payload > 1 {
            return Err(WireError::BadVarint);
        }
        len |= payload << (7 * i);
        if byte[0] & 0x80 == 0 {
            return Ok(Some(len));
        }
    }
    Err(WireError::BadVarint)
}

fn eof_is_truncation(e: std::io::Error) -> WireError {
    if e.kind() == ErrorKind::UnexpectedEof {
        WireError::Truncated
    } else {
        WireError::Io(e)
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use futures::executor::block_on;
    use futures::io::Cursor;
    use proptest::prelude::*;

    use super::*;
    use crate::encode_tensor;
    use crate::v1::{ClientFrame, Dtype, ErrorCode, OpenSession, ServerFrame};

    const MAX: usize = 1 << 20;

    fn frames() -> Vec<ClientFrame> {
        vec![
            ClientFrame::open(OpenSession {
                fingerprint: vec![7; 32],
                start_block: 3,
                end_block: 9,
                max_length: 2048,
                wire_dtype: Dtype::F16 as i32,
            }),
            ClientFrame::step(0, encode_tensor(&[1.0; 12], &[3, 4], Dtype::F32)),
            ClientFrame::step(3, encode_tensor(&[0.5; 4], &[1, 4], Dtype::Bf16)),
            ClientFrame::close(),
        ]
    }

    fn read_all(bytes: Vec<u8>, max_len: usize) -> Result<Vec<ClientFrame>, WireError> {
        let mut r = Cursor::new(bytes);
        let mut out = Vec::new();
        while let Some(f) = block_on(read_frame(&mut r, max_len))? {
            out.push(f);
        }
        Ok(out)
    }

    fn written(frames: &[ClientFrame]) -> Vec<u8> {
        let mut buf = Vec::new();
        for f in frames {
            block_on(write_frame(&mut buf, f)).unwrap();
        }
        buf
    }

    /// Hands out one byte per read and is pending every other poll, like a slow network.
    struct Trickle {
        data: Vec<u8>,
        pos: usize,
        stall: bool,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<std::io::Result<usize>> {
            self.stall = !self.stall;
            if self.stall {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let Some(&b) = self.data.get(self.pos) else {
                return Poll::Ready(Ok(0));
            };
            match buf.first_mut() {
                Some(slot) => {
                    *slot = b;
                    self.pos += 1;
                    Poll::Ready(Ok(1))
                }
                None => Poll::Ready(Ok(0)),
            }
        }
    }

    #[test]
    fn frames_round_trip() {
        let sent = frames();
        let bytes = written(&sent);
        assert_eq!(read_all(bytes.clone(), MAX).unwrap(), sent);

        let mut r = Trickle {
            data: bytes,
            pos: 0,
            stall: false,
        };
        for f in &sent {
            assert_eq!(block_on(read_frame(&mut r, MAX)).unwrap().as_ref(), Some(f));
        }
        assert!(block_on(read_frame::<_, ClientFrame>(&mut r, MAX))
            .unwrap()
            .is_none());
    }

    #[test]
    fn large_frames_read_in_pieces_are_timed_small_ones_are_not() {
        let big = ClientFrame::step(0, encode_tensor(&[0.25; 64 * 576], &[64, 576], Dtype::F32));
        let small = &frames()[1];
        let mut r = Trickle {
            data: written(&[big.clone(), small.clone()]),
            pos: 0,
            stall: false,
        };
        let got = block_on(read_timed::<_, ClientFrame>(&mut r, MAX))
            .unwrap()
            .unwrap();
        assert_eq!(got.frame, big);
        assert!(got.rate.is_some_and(|r| r > 0));
        let got = block_on(read_timed::<_, ClientFrame>(&mut r, MAX))
            .unwrap()
            .unwrap();
        assert_eq!((&got.frame, got.rate), (small, None));
        // In one piece (all of it buffered): no spacing to read a rate from.
        let mut r = Cursor::new(written(std::slice::from_ref(&big)));
        let got = block_on(read_timed::<_, ClientFrame>(&mut r, MAX))
            .unwrap()
            .unwrap();
        assert_eq!(got.rate, None);
    }

    #[test]
    fn server_frames_round_trip() {
        let sent = vec![
            ServerFrame::opened(512, 64),
            ServerFrame::result(encode_tensor(&[2.0; 8], &[2, 4], Dtype::F16), 1.5),
            ServerFrame::error(ErrorCode::Busy, "try later"),
        ];
        let mut buf = Vec::new();
        for f in &sent {
            block_on(write_frame(&mut buf, f)).unwrap();
        }
        let mut r = Cursor::new(buf);
        for f in &sent {
            assert_eq!(block_on(read_frame(&mut r, MAX)).unwrap().as_ref(), Some(f));
        }
    }

    #[test]
    fn prefix_matches_prost_length_delimited() {
        let sent = &frames()[1..2];
        let decoded = ClientFrame::decode_length_delimited(written(sent).as_slice());
        assert_eq!(decoded.unwrap(), sent[0]);
    }

    #[test]
    fn clean_eof_is_none() {
        assert!(read_all(Vec::new(), MAX).unwrap().is_empty());
        // An empty message is a valid frame (length 0), distinct from EOF.
        assert_eq!(
            read_all(vec![0], MAX).unwrap(),
            vec![ClientFrame::default()]
        );
    }

    #[test]
    fn oversize_length_is_rejected_before_allocating() {
        // Header claims 1 TiB and nothing follows; allocating it would abort the test.
        let tib = 1u64 << 40;
        let mut header = Vec::new();
        prost::encoding::encode_varint(tib, &mut header);
        match read_all(header, MAX) {
            Err(WireError::FrameTooLarge { len, max }) => assert_eq!((len, max), (tib, MAX)),
            other => panic!("expected FrameTooLarge, got {other:?}"),
        }
        let bytes = written(&frames()[1..2]);
        let err = read_all(bytes.clone(), bytes.len() - 2).unwrap_err();
        assert!(err
            .to_string()
            .contains(&format!("limit of {}", bytes.len() - 2)));
        assert!(read_all(bytes.clone(), bytes.len() - 1).is_ok());
    }

    #[test]
    fn eof_inside_frame_is_truncated() {
        let mut bytes = written(&frames());
        bytes.pop();
        let err = read_all(bytes, MAX).unwrap_err();
        assert!(matches!(err, WireError::Truncated), "{err:?}");
        assert!(err.to_string().contains("truncated frame"));
        // EOF in the middle of the length prefix.
        let err = read_all(vec![0x80, 0x80], MAX).unwrap_err();
        assert!(matches!(err, WireError::Truncated), "{err:?}");
    }

    #[test]
    fn bad_varint_is_rejected() {
        let too_long = vec![0x80; 11];
        assert!(matches!(read_all(too_long, MAX), Err(WireError::BadVarint)));
        // Ten bytes whose last one carries more than the top bit of a u64.
        let mut overflow = vec![0xff; 9];
        overflow.push(0x02);
        assert!(matches!(read_all(overflow, MAX), Err(WireError::BadVarint)));
        let mut max = vec![0xff; 9];
        max.push(0x01);
        let err = read_all(max, MAX).unwrap_err();
        assert!(
            matches!(err, WireError::FrameTooLarge { len: u64::MAX, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn garbage_body_is_a_decode_error() {
        let err = read_all(vec![2, 0xff, 0xff], MAX).unwrap_err();
        assert!(matches!(err, WireError::Decode(_)), "{err:?}");
    }

    /// Reads frames of type `M` from `bytes` until the end or the first error, and decodes
    /// every tensor in them under a session's bounds, as the node and the client do.
    fn read_and_decode<M: prost::Message + Default>(
        bytes: &[u8],
        max_len: usize,
        tensor: impl Fn(&M) -> Option<&crate::v1::Tensor>,
    ) {
        let mut r = Cursor::new(bytes);
        for _ in 0..bytes.len() + 1 {
            match block_on(read_frame::<_, M>(&mut r, max_len)) {
                Ok(Some(frame)) => {
                    if let Some(t) = tensor(&frame) {
                        let _ = crate::decode_tensor(t, &crate::hidden_limits(8, 16));
                    }
                }
                Ok(None) | Err(_) => return,
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = read_all(bytes, 64);
        }

        /// The frame decoder as a fuzz target: arbitrary bytes, read as either side's frames
        /// with a session's frame bound, and every tensor in them decoded: an error or a
        /// value, never a panic or an allocation past the bound.
        #[test]
        fn arbitrary_bytes_as_either_sides_frames_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..2048),
        ) {
            use crate::v1::{client_frame, server_frame};
            read_and_decode::<ClientFrame>(&bytes, 4096, |f| match &f.kind {
                Some(client_frame::Kind::Step(s)) => s.hidden.as_ref(),
                _ => None,
            });
            read_and_decode::<ServerFrame>(&bytes, 4096, |f| match &f.kind {
                Some(server_frame::Kind::Result(r)) => r.hidden.as_ref(),
                _ => None,
            });
        }
    }
}
