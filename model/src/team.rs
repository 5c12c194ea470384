//! The threads that share a forward pass's matrix products, kept awake between products.
//!
//! A decode step of a small model is ~150 products of a few tens of microseconds each, with
//! serial work (norms, RoPE, attention of one token) between them. Rayon's idle workers go to
//! sleep within microseconds, and on a virtual machine waking a halted vCPU costs about as much as
//! the product itself: two-thread decode ran at 1.2x one thread or 1.6x depending on whether the
//! second thread happened to be asleep (measured on a 2-vCPU Xeon VM; llama.cpp, whose threads
//! spin between operations, steadily got 1.6x). Here helpers poll (yielding the core to anything
//! else that wants it) for a short while after each product and only then park, so a token's
//! products start at once and an idle node costs nothing after [`SPIN`].
//!
//! One caller at a time uses the team (the compute thread of a node, the local generator); a
//! second concurrent caller runs on rayon instead. Results never depend on which threads ran
//! which tasks: every task writes its own output rows.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a helper keeps polling for the next product before it parks: longer than the serial
/// work between two products of a token, short enough that an idle node stops burning a core
/// almost at once.
pub const SPIN: Duration = Duration::from_millis(2);

/// A job: run `f(i)` for `i` in `0..n`.
#[derive(Clone, Copy)]
struct Job {
    f: *const (dyn Fn(usize) + Sync),
    n: usize,
}

struct Shared {
    /// Bumped once per job; helpers watch it.
    generation: AtomicU64,
    /// Whether `job` may be read (set before `generation` is bumped, cleared when the caller is
    /// done with it).
    open: AtomicBool,
    job: UnsafeCell<Job>,
    next: AtomicUsize,
    done: AtomicUsize,
    /// Helpers between checking `open` and leaving the job: the caller waits for zero before its
    /// closure goes out of scope.
    inside: AtomicUsize,
    sleepers: AtomicUsize,
    stop: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written only by the caller holding the team (while `open` is false and no
// helper is inside) and read by helpers only while `open` is true and they are counted in
// `inside`; the closure it points to is `Sync`.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

/// The team: helper threads plus whoever calls [`Team::run`].
pub struct Team {
    shared: Arc<Shared>,
    caller: Mutex<()>,
    helpers: Vec<JoinHandle<()>>,
}

static TEAM: OnceLock<Team> = OnceLock::new();

/// Starts the team for `threads` threads in all (the caller is one of them). Without it (or with
/// one thread) products run on rayon's pool. Later calls keep the first team.
pub fn init(threads: usize) {
    if threads > 1 {
        TEAM.get_or_init(|| Team::new(threads - 1));
    }
}

/// Runs `f(0..n)` on the team when it exists and is free, else on rayon's pool (`n > 1`), else
/// inline.
pub fn run(n: usize, f: &(dyn Fn(usize) + Sync)) {
    if n == 0 {
        return;
    }
    if n > 1 {
        if let Some(team) = TEAM.get() {
            if let Ok(_guard) = team.caller.try_lock() {
                team.run_locked(n, f);
                return;
            }
        }
        if rayon::current_num_threads() > 1 {
            use rayon::prelude::*;
            (0..n).into_par_iter().for_each(f);
            return;
        }
    }
    (0..n).for_each(f);
}

/// Runs `f(i, chunk i)` for every `width`-long chunk of `out` (the last may be shorter), as
/// [`run`] does: the forward pass's other parallel regions (attention heads, row-wise work of a
/// prompt) go to the same awake threads as the products. On rayon, each region woke a sleeping
/// worker that then spun beside the team's helper: three busy threads on two cores, and
/// two-thread decode at 1.1x one thread.
pub fn run_chunks<T: Send>(out: &mut [T], width: usize, f: &(dyn Fn(usize, &mut [T]) + Sync)) {
    struct Base<T>(*mut T);
    // SAFETY: tasks get disjoint chunks of `out` (below), which outlives `run`, and `T: Send`.
    unsafe impl<T: Send> Sync for Base<T> {}
    let width = width.max(1);
    let len = out.len();
    let base = Base(out.as_mut_ptr());
    let base = &base;
    run(len.div_ceil(width), &|i| {
        let start = i * width;
        let end = (start + width).min(len);
        // SAFETY: chunk `i` is `out[start..end]`, in bounds and touched by task `i` only.
        let chunk = unsafe { std::slice::from_raw_parts_mut(base.0.add(start), end - start) };
        f(i, chunk)
    });
}

/// Threads that run products: the team's size when there is one, else rayon's.
pub fn threads() -> usize {
    TEAM.get()
        .map(|t| t.helpers.len() + 1)
        .unwrap_or_else(rayon::current_num_threads)
}

impl Team {
    fn new(helpers: usize) -> Self {
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            open: AtomicBool::new(false),
            job: UnsafeCell::new(Job {
                f: &nothing as &(dyn Fn(usize) + Sync) as *const _,
                n: 0,
            }),
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            inside: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let helpers = (0..helpers)
            .map(|i| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("compute-team-{i}"))
                    .spawn(move || helper(&shared))
                    .expect("spawning a compute thread")
            })
            .collect();
        Self {
            shared,
            caller: Mutex::new(()),
            helpers,
        }
    }

    /// The caller's side; `self.caller` is held.
    fn run_locked(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        let s = &*self.shared;
        // SAFETY: `open` is false and no helper is inside (the previous call waited for that),
        // so nobody reads `job` now. The lifetime is erased; the pointer is dereferenced only
        // while this call has not returned (see the wait below).
        unsafe {
            let f: *const (dyn Fn(usize) + Sync + '_) = f;
            *s.job.get() = Job {
                f: std::mem::transmute::<
                    *const (dyn Fn(usize) + Sync + '_),
                    *const (dyn Fn(usize) + Sync),
                >(f),
                n,
            };
        }
        s.next.store(0, SeqCst);
        s.done.store(0, SeqCst);
        s.open.store(true, SeqCst);
        s.generation.fetch_add(1, SeqCst);
        if s.sleepers.load(SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        // Even if a task panics here, the closure must outlive every helper's use of it.
        let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(s, f, n)));
        // Every task claimed has finished, then no helper may still hold the closure.
        while s.done.load(SeqCst) < n {
            std::thread::yield_now();
        }
        s.open.store(false, SeqCst);
        while s.inside.load(SeqCst) > 0 {
            std::thread::yield_now();
        }
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
    }
}

fn nothing(_: usize) {}

/// Claims and runs tasks until none are left.
fn work(s: &Shared, f: &(dyn Fn(usize) + Sync), n: usize) {
    loop {
        let i = s.next.fetch_add(1, SeqCst);
        if i >= n {
            return;
        }
        // A panicking task must still count as done, or the caller would wait forever; the
        // panic itself goes on (to the helper's thread, or the caller's).
        struct Done<'a>(&'a AtomicUsize);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.fetch_add(1, SeqCst);
            }
        }
        let _done = Done(&s.done);
        f(i);
    }
}

fn helper(s: &Shared) {
    let mut seen = 0u64;
    loop {
        // Wait for a new job: spin first, then park.
        let started = Instant::now();
        let mut polls = 0u32;
        loop {
            if s.stop.load(SeqCst) {
                return;
            }
            if s.generation.load(SeqCst) != seen {
                break;
            }
            // Yielding, not spinning on the spot: on a busy device (other processes, the node's
            // network threads, more threads than cores) a pure spin would take the core from
            // the very thread this one waits for; with nothing else to run, it returns at once
            // and the vCPU stays awake.
            std::thread::yield_now();
            polls = polls.wrapping_add(1);
            if polls.is_multiple_of(16) && started.elapsed() > SPIN {
                let mut g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                s.sleepers.fetch_add(1, SeqCst);
                while s.generation.load(SeqCst) == seen && !s.stop.load(SeqCst) {
                    g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                s.sleepers.fetch_sub(1, SeqCst);
                break;
            }
        }
        seen = s.generation.load(SeqCst);
        s.inside.fetch_add(1, SeqCst);
        if s.open.load(SeqCst) {
            // SAFETY: `open` was true after we were counted in `inside`, so the caller has not
            // returned and will not until we leave; the job it wrote is the current one.
            let job = unsafe { *s.job.get() };
            let f = unsafe { &*job.f };
            let panicked =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(s, f, job.n)));
            s.inside.fetch_sub(1, SeqCst);
            if let Err(p) = panicked {
                std::panic::resume_unwind(p);
            }
        } else {
            s.inside.fetch_sub(1, SeqCst);
        }
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        {
            let _g = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for h in self.helpers.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_task_runs_once_across_many_jobs_and_after_parking() {
        let team = Team::new(1);
        let _guard = team.caller.lock().unwrap();
        for round in 0..2000usize {
            let n = 1 + round % 37;
            let hits: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
            team.run_locked(n, &|i| {
                hits[i].fetch_add(1, SeqCst);
            });
            assert!(hits.iter().all(|h| h.load(SeqCst) == 1), "round {round}");
            if round % 500 == 0 {
                // Long enough for the helper to park; the next job must wake it or run alone.
                std::thread::sleep(SPIN * 3);
            }
        }
    }

    /// 200 jobs of `n` tasks, each adding its index to its own counter.
    fn run_jobs(n: usize) -> Vec<u32> {
        let out: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
        for _ in 0..200 {
            run(n, &|i| {
                out[i].fetch_add(i as u32, SeqCst);
            });
        }
        out.iter().map(|v| v.load(SeqCst)).collect()
    }

    #[test]
    fn chunks_cover_the_slice_once_with_a_short_last_one() {
        init(2);
        let mut out = vec![0f32; 103];
        run_chunks(&mut out, 10, &|i, chunk| {
            assert_eq!(chunk.len(), if i == 10 { 3 } else { 10 });
            for (j, v) in chunk.iter_mut().enumerate() {
                *v += (i * 10 + j) as f32;
            }
        });
        assert_eq!(out, (0..103).map(|v| v as f32).collect::<Vec<_>>());
    }

    #[test]
    fn a_second_caller_falls_back_and_gets_the_same_result() {
        init(2);
        let n = 64;
        let (a, b) = std::thread::scope(|sc| {
            let one = sc.spawn(|| run_jobs(n));
            let two = sc.spawn(|| run_jobs(n));
            (one.join().unwrap(), two.join().unwrap())
        });
        let want: Vec<u32> = (0..n as u32).map(|i| i * 200).collect();
        assert_eq!(a, want);
        assert_eq!(b, want);
    }
}
