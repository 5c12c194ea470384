//! How fast a link delivers bytes, read off the arrival of one large frame.
//!
//! A frame's total time says little about the link's rate: on a connection that was idle, TCP
//! and QUIC send about ten packets, wait a round trip for their acknowledgements, send twice as
//! many, and so on, so a 300 kB transfer over a 30 Mbit/s link with a 70 ms round trip spends
//! most of its time waiting between bursts, and the same happens at 3 Mbit/s. Within a burst,
//! though, packets leave the slowest link on the path one right after the other and arrive
//! spaced by that link's rate (the packet-train dispersion that bandwidth estimators such as
//! pathrate use). So the rate here is taken from the spacing of the reads, not from the total:
//! each read's bytes over the time since the previous read, and the median of those per-byte
//! rates. The few reads that waited out a gap between bursts carry few bytes and fall below the
//! median; reads that found several packets buffered (the reader was late) come out faster than
//! the link, which errs towards a fast link, where a sender keeps hidden states exact.

use std::time::{Duration, Instant};

/// Frames whose body is shorter than this are not measured: they fit in the first burst of a
/// new connection, so their reads say nothing about spacing.
pub const MIN_MEASURED_BYTES: usize = 32 * 1024;
/// At least this many timed reads after the first, so one odd read cannot set the median.
const MIN_READS: usize = 8;
/// Reads timed per frame at most: a few megabytes of packets, plenty for a median, and a peer
/// that trickles a large frame a byte at a time cannot make the meter outgrow the frame.
const MAX_READS: usize = 4096;
/// Reads closer than this are below what the clock and the scheduler resolve: counted as this.
const MIN_GAP: Duration = Duration::from_micros(20);

/// The reads of one frame body, as they happen.
pub struct ArrivalMeter {
    last: Option<Instant>,
    /// Bytes and the time since the previous read, for every read after the first.
    reads: Vec<(usize, Duration)>,
    total: usize,
}

impl ArrivalMeter {
    /// A meter for a body of `len` bytes; none (nothing will be measured) below
    /// [`MIN_MEASURED_BYTES`].
    pub fn for_body(len: usize) -> Option<Self> {
        (len >= MIN_MEASURED_BYTES).then(|| Self {
            last: None,
            reads: Vec::new(),
            total: 0,
        })
    }

    /// Records a read of `n` bytes that returned at `at`. The first read only starts the
    /// clock: its bytes may have waited in a buffer for any time.
    pub fn read(&mut self, n: usize, at: Instant) {
        if self.reads.len() == MAX_READS {
            return;
        }
        if let Some(last) = self.last {
            self.reads.push((n, at.saturating_duration_since(last)));
            self.total += n;
        }
        self.last = Some(at);
    }

    /// The link's rate in bytes per second, if the frame was read in enough pieces to tell.
    pub fn rate(&self) -> Option<u64> {
        median_rate(&self.reads, self.total)
    }
}

/// The byte-weighted median of `bytes / gap` over `reads` (`total` is their byte sum).
fn median_rate(reads: &[(usize, Duration)], total: usize) -> Option<u64> {
    if reads.len() < MIN_READS || total == 0 {
        return None;
    }
    let mut rates: Vec<(f64, usize)> = reads
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|&(n, gap)| (n as f64 / gap.max(MIN_GAP).as_secs_f64(), n))
        .collect();
    rates.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut seen = 0;
    for (rate, n) in rates {
        seen += n;
        if 2 * seen >= total {
            return Some(rate as u64);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSS: usize = 1400;

    /// The reads of `bytes` sent at `rate` bytes/s in slow-start bursts (10 packets, then
    /// twice as many each round trip of `rtt`), one packet per read, as a reader that keeps up
    /// sees them.
    fn slow_start(bytes: usize, rate: f64, rtt: Duration) -> Vec<(usize, Duration)> {
        let per_packet = Duration::from_secs_f64(MSS as f64 / rate);
        let (mut reads, mut left, mut window) = (Vec::new(), bytes, 10);
        let mut first = true;
        while left > 0 {
            let burst = (window * MSS).min(left);
            let mut gap = if first {
                Duration::ZERO
            } else {
                rtt.saturating_sub(per_packet * (window as u32 / 2))
            };
            for sent in (0..burst).step_by(MSS) {
                let n = MSS.min(burst - sent);
                gap += per_packet.mul_f64(n as f64 / MSS as f64);
                reads.push((n, gap));
                gap = Duration::ZERO;
            }
            first = false;
            left -= burst;
            window *= 2;
        }
        reads
    }

    fn rate_of(reads: &[(usize, Duration)]) -> Option<u64> {
        let mut m = ArrivalMeter::for_body(reads.iter().map(|r| r.0).sum()).unwrap();
        let t0 = Instant::now();
        let mut at = t0;
        m.read(512, t0);
        for &(n, gap) in reads {
            at += gap;
            m.read(n, at);
        }
        m.rate()
    }

    #[test]
    fn the_rate_of_the_slowest_link_shows_through_slow_start_at_any_round_trip() {
        for mbit in [1.0, 3.0, 10.0, 30.0] {
            let rate = mbit * 1e6 / 8.0;
            for rtt_ms in [1, 20, 70, 200] {
                // 128 rows of width 576: f32, f16, q8.
                for bytes in [294_912, 147_456, 74_240] {
                    let reads = slow_start(bytes, rate, Duration::from_millis(rtt_ms));
                    let got = rate_of(&reads).unwrap() as f64;
                    assert!(
                        (got / rate - 1.0).abs() < 0.05,
                        "{mbit} Mbit/s, {rtt_ms} ms, {bytes} B: measured {got} B/s"
                    );
                }
            }
        }
    }

    #[test]
    fn a_late_reader_sees_a_faster_link_never_a_slower_one() {
        let rate = 3e6 / 8.0;
        let reads = slow_start(147_456, rate, Duration::from_millis(70));
        // The reader was busy: every four packets arrive in one read.
        let lumped: Vec<(usize, Duration)> = reads
            .chunks(4)
            .map(|c| (c.iter().map(|r| r.0).sum(), c.iter().map(|r| r.1).sum()))
            .collect();
        let exact = rate_of(&reads).unwrap();
        let late = rate_of(&lumped).unwrap();
        assert!(late >= exact, "{late} < {exact}");
    }

    #[test]
    fn small_frames_and_frames_in_few_pieces_are_not_measured() {
        assert!(ArrivalMeter::for_body(MIN_MEASURED_BYTES - 1).is_none());
        // A large frame that arrived in three reads: nothing to tell the spacing from.
        let mut m = ArrivalMeter::for_body(100_000).unwrap();
        let t = Instant::now();
        for (i, n) in [40_000, 30_000, 30_000].into_iter().enumerate() {
            m.read(n, t + Duration::from_millis(i as u64));
        }
        assert_eq!(m.rate(), None);
    }

    #[test]
    fn a_frame_in_a_great_many_pieces_is_timed_on_its_first_ones_only() {
        let mut m = ArrivalMeter::for_body(1 << 20).unwrap();
        let t = Instant::now();
        for i in 0..100_000u64 {
            // One byte every 50 µs at first, then far slower: the later reads are not kept.
            let at = if i <= MAX_READS as u64 {
                i * 50
            } else {
                i * 1_000
            };
            m.read(1, t + Duration::from_micros(at));
        }
        assert_eq!(m.reads.len(), MAX_READS);
        let rate = m.rate().unwrap();
        assert!((19_999..=20_000).contains(&rate), "{rate}");
    }

    #[test]
    fn reads_faster_than_the_clock_count_as_very_fast_not_infinite() {
        let reads = vec![(MSS, Duration::ZERO); 64];
        let got = rate_of(&reads).unwrap();
        assert_eq!(got, (MSS as f64 / MIN_GAP.as_secs_f64()) as u64);
    }
}
