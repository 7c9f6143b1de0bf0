//! A team of spinning worker threads for the many short parallel loops of a step.
//!
//! A batch-1 decode step of V2-Lite runs ~30 parallel loops per layer of 20-70 µs each.
//! rayon lets an idle worker yield a few times and then sleep, and wakes it through the
//! kernel for the next loop: on the 2-core development VM `perf` put ~15% of a decode
//! step's CPU time in the scheduler (wake-ups, `sched_yield`, context switches), and a
//! run of 8 expert products cost ~7 µs a product more than one product of the same bytes.
//! The team's workers instead spin on a shared generation counter for `SPIN` after
//! their last task, so the next loop starts within a cache-line transfer; then they park,
//! so an idle engine costs nothing.
//!
//! One caller owns the team at a time. A loop started while the team is busy (another
//! thread's loop, or a loop nested inside a task) runs serially on its caller, which
//! gives the same results: every kernel's arithmetic per output is independent of how
//! its tasks are spread over threads.

use std::any::Any;
use std::cell::{Cell, UnsafeCell};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe, Location};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use crate::kernels::SyncPtr;

/// How long a worker spins for the next loop before it parks: longer than the serial
/// stretches inside a decode step (norms, routing, sampling), short against a step.
const SPIN: Duration = Duration::from_micros(400);

thread_local! {
    /// Set on team workers and on a caller while it runs tasks: loops started there
    /// run serially (the team is already busy with the outer loop).
    static IN_TEAM: Cell<bool> = const { Cell::new(false) };
    /// Set on the thread that called [`profile_start`]: only its loops are timed.
    static PROFILER: Cell<bool> = const { Cell::new(false) };
}

/// A lifetime-erased task body.
type TaskFn = dyn Fn(usize) + Sync;

struct Team {
    /// Threads of the team, the caller included.
    threads: usize,
    /// Set while a caller owns the team.
    busy: AtomicBool,
    /// Odd while a loop is open to the workers; bumped twice per loop.
    generation: AtomicU64,
    /// The open loop's body and task count; written only by the owner while no worker
    /// is inside ([`Team::inside`] is zero and the generation is even).
    job: UnsafeCell<(Option<*const TaskFn>, usize)>,
    /// Next task index to hand out.
    next: AtomicUsize,
    /// Tasks of the open loop not yet finished.
    remaining: AtomicUsize,
    /// Workers that may be reading `job`.
    inside: AtomicUsize,
    /// Workers parked (or about to park).
    parked: AtomicUsize,
    /// The first panic of a task of the open loop, re-raised by the owner.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    workers: OnceLock<Vec<Thread>>,
}

// SAFETY: `job` is written only by the thread that owns the team (`busy`), while no
// worker can read it (protocol in `Team::run`); everything else is atomics or locks.
unsafe impl Sync for Team {}

fn team() -> &'static Team {
    static TEAM: OnceLock<&'static Team> = OnceLock::new();
    TEAM.get_or_init(|| {
        let threads = rayon::current_num_threads().max(1);
        let team: &'static Team = Box::leak(Box::new(Team {
            threads,
            busy: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            job: UnsafeCell::new((None, 0)),
            next: AtomicUsize::new(0),
            remaining: AtomicUsize::new(0),
            inside: AtomicUsize::new(0),
            parked: AtomicUsize::new(0),
            panic: Mutex::new(None),
            workers: OnceLock::new(),
        }));
        let workers = (1..threads)
            .map(|i| {
                thread::Builder::new()
                    .name(format!("dsv2-team-{i}"))
                    .spawn(move || team.work())
                    .expect("spawn a team worker thread")
                    .thread()
                    .clone()
            })
            .collect();
        let _ = team.workers.set(workers);
        team
    })
}

/// Threads that run a loop's tasks (the caller included): rayon's thread count.
pub fn threads() -> usize {
    team().threads
}

/// Set while loops are timed ([`profile_start`]); read once per loop and per task batch.
static PROFILING: AtomicBool = AtomicBool::new(false);
/// Nanoseconds the team's threads spent in tasks of timed loops (workers add theirs as
/// they leave a loop; the loop's owner reads it once no worker is inside).
static PROFILE_BUSY_NS: AtomicU64 = AtomicU64::new(0);
/// The timed loops, by call site, and when the last one ended.
static PROFILE: Mutex<Profile> = Mutex::new(Profile {
    sites: Vec::new(),
    last_end: None,
    threads: 0,
});

struct Profile {
    sites: Vec<LoopSite>,
    last_end: Option<Instant>,
    threads: usize,
}

/// What the loops started at one line of code cost.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoopSite {
    /// Where the loop is started (`file:line`).
    pub site: &'static Location<'static>,
    /// Whether its loops ran on the caller alone (one task, a busy team, or one thread).
    pub serial: bool,
    /// Loops started there, and their tasks.
    pub loops: u64,
    pub tasks: u64,
    /// Wall seconds of those loops on their caller, from opening to the last task's end.
    pub loop_s: f64,
    /// Seconds the team's threads spent inside their tasks, summed over threads.
    pub busy_s: f64,
    /// Wall seconds from the end of the previous timed loop (or [`profile_start`]) to
    /// the start of each of these: the serial work on the caller just before them.
    pub before_s: f64,
}

/// What the team's loops cost between [`profile_start`] and [`profile_take`]: where a
/// many-thread decode step loses time to loop starts, unequal tasks and the serial work
/// between loops (`dsv2 bench --loop-profile`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoopProfile {
    /// Threads of the team.
    pub threads: usize,
    /// Each call site's loops, in the order first seen.
    pub sites: Vec<LoopSite>,
}

impl LoopProfile {
    /// Sums over the sites whose loops were spread over the team (`serial == false`) or
    /// ran on the caller alone (`true`); the sum's `site` is only this call's location.
    pub fn total(&self, serial: bool) -> LoopSite {
        let mut sum = LoopSite {
            site: Location::caller(),
            serial,
            loops: 0,
            tasks: 0,
            loop_s: 0.0,
            busy_s: 0.0,
            before_s: 0.0,
        };
        for s in self.sites.iter().filter(|s| s.serial == serial) {
            sum.add(s);
        }
        sum
    }

    /// Seconds between loops: every site's `before_s`.
    pub fn between_s(&self) -> f64 {
        self.sites.iter().map(|s| s.before_s).sum()
    }
}

impl LoopSite {
    fn add(&mut self, other: &LoopSite) {
        self.loops += other.loops;
        self.tasks += other.tasks;
        self.loop_s += other.loop_s;
        self.busy_s += other.busy_s;
        self.before_s += other.before_s;
    }

    /// Share of the threads' time inside these loops that ran tasks: below 1 by the
    /// loops' start latency and by tasks that end unequally.
    pub fn busy_fraction(&self, threads: usize) -> f64 {
        self.busy_s / (self.loop_s * threads as f64).max(f64::MIN_POSITIVE)
    }
}

impl std::ops::AddAssign for LoopProfile {
    fn add_assign(&mut self, other: Self) {
        self.threads = self.threads.max(other.threads);
        for site in other.sites {
            match self
                .sites
                .iter_mut()
                .find(|s| s.site == site.site && s.serial == site.serial)
            {
                Some(s) => s.add(&site),
                None => self.sites.push(site),
            }
        }
    }
}

fn profile_lock() -> std::sync::MutexGuard<'static, Profile> {
    PROFILE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts timing the loops this thread starts (forgetting earlier timings). Timing costs
/// two clock reads a task and a lock a loop, so it is off unless asked for.
pub fn profile_start() {
    PROFILER.with(|p| p.set(true));
    let mut profile = profile_lock();
    profile.sites.clear();
    profile.threads = threads();
    PROFILE_BUSY_NS.store(0, Ordering::Relaxed);
    profile.last_end = Some(Instant::now());
    PROFILING.store(true, Ordering::SeqCst);
}

/// Stops timing and returns what the loops cost since [`profile_start`], on the thread
/// that called it, between its loops.
pub fn profile_take() -> LoopProfile {
    PROFILING.store(false, Ordering::SeqCst);
    PROFILER.with(|p| p.set(false));
    let mut profile = profile_lock();
    LoopProfile {
        threads: profile.threads,
        sites: std::mem::take(&mut profile.sites),
    }
}

/// Records a timed loop of `tasks` tasks at `site` that ran from `started` to now, its
/// threads `busy_ns` inside tasks.
fn profile_record(
    site: &'static Location<'static>,
    serial: bool,
    tasks: usize,
    started: Instant,
    busy_ns: u64,
) {
    let now = Instant::now();
    let mut profile = profile_lock();
    let before = profile.last_end.map_or(0.0, |end| {
        started.saturating_duration_since(end).as_secs_f64()
    });
    profile.last_end = Some(now);
    let entry = LoopSite {
        site,
        serial,
        loops: 1,
        tasks: tasks as u64,
        loop_s: (now - started).as_secs_f64(),
        busy_s: busy_ns as f64 * 1e-9,
        before_s: before,
    };
    match profile
        .sites
        .iter_mut()
        .find(|s| s.site == site && s.serial == serial)
    {
        Some(s) => s.add(&entry),
        None => profile.sites.push(entry),
    }
}

fn elapsed_ns(since: Instant) -> u64 {
    since.elapsed().as_nanos() as u64
}

/// Largest task of a decode product, in bytes of weights: each task restarts the weight
/// stream (its first reads wait on memory), so a decode product runs as few long tasks,
/// capped so that a product much larger than the team's share still balances.
pub(crate) const DECODE_TASK_BYTES: usize = 4 << 20;

/// Items (weight rows, or row tiles) per task of a memory-bound decode product of
/// `items` items of `item_bytes` each over `threads` threads: `per_thread` tasks a
/// thread, at most [`DECODE_TASK_BYTES`] each, at least and a multiple of `align` items.
pub(crate) fn decode_task_len(
    items: usize,
    item_bytes: usize,
    threads: usize,
    per_thread: usize,
    align: usize,
) -> usize {
    let by_bytes = (DECODE_TASK_BYTES / item_bytes.max(1)).max(align);
    items
        .div_ceil(per_thread * threads)
        .clamp(align, by_bytes)
        .next_multiple_of(align)
}

/// Runs `f(0..tasks)`, spread over the team; returns when every task has finished.
/// Tasks are handed out one at a time in index order. A panic in a task is re-raised
/// here after every other task has finished.
#[track_caller]
pub fn for_each(tasks: usize, f: impl Fn(usize) + Sync) {
    if IN_TEAM.with(Cell::get) {
        return serially(tasks, f);
    }
    let profiling = PROFILING.load(Ordering::Relaxed) && PROFILER.with(Cell::get);
    let started = profiling.then(Instant::now);
    // The team, if this loop is worth it and nobody else holds it.
    let team = (tasks > 1).then(team).filter(|team| {
        team.threads > 1
            && team
                .busy
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
    });
    let Some(team) = team else {
        serially(tasks, f);
        if let Some(started) = started {
            let busy = elapsed_ns(started);
            profile_record(Location::caller(), true, tasks, started, busy);
        }
        return;
    };
    let busy_before = profiling.then(|| PROFILE_BUSY_NS.load(Ordering::Relaxed));
    team.run(tasks, &f);
    if let (Some(started), Some(before)) = (started, busy_before) {
        let busy = PROFILE_BUSY_NS.load(Ordering::Relaxed) - before;
        profile_record(Location::caller(), false, tasks, started, busy);
    }
    team.busy.store(false, Ordering::Release);
}

/// A loop on the calling thread, with the team's panic behaviour.
fn serially(tasks: usize, f: impl Fn(usize)) {
    let mut first_panic = None;
    for i in 0..tasks {
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| f(i))) {
            first_panic.get_or_insert(payload);
        }
    }
    if let Some(payload) = first_panic {
        resume_unwind(payload);
    }
}

/// Runs `f(i, chunk)` for each `size`-long chunk of `data` (the last may be shorter),
/// spread over the team.
#[track_caller]
pub fn for_each_chunk_mut<T: Send>(
    data: &mut [T],
    size: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    assert!(size > 0, "chunk size 0");
    let len = data.len();
    let base = SyncPtr(data.as_mut_ptr());
    for_each(len.div_ceil(size), |i| {
        let start = i * size;
        let n = size.min(len - start);
        // SAFETY: chunk i covers start..start + n of `data`, disjoint from every other
        // task's chunk, and `data` is borrowed mutably for the whole loop.
        f(i, unsafe {
            std::slice::from_raw_parts_mut(base.get().add(start), n)
        });
    });
}

impl Team {
    /// Opens a loop to the workers, takes tasks on the calling thread too, waits until
    /// every task has finished and no worker can still read the loop. Needs `busy`.
    fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        // SAFETY: the lifetime is erased only for the duration of this call: the loop is
        // closed and every worker has left it (`inside == 0`) before we return.
        let f: *const TaskFn =
            unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static TaskFn>(f) };
        // SAFETY: we own the team and the generation is even, so no worker reads `job`.
        unsafe { *self.job.get() = (Some(f), tasks) };
        self.next.store(0, Ordering::Relaxed);
        self.remaining.store(tasks, Ordering::Relaxed);
        let open = self.generation.load(Ordering::Relaxed) + 1;
        self.generation.store(open, Ordering::SeqCst);
        if self.parked.load(Ordering::SeqCst) > 0 {
            for worker in self.workers.get().into_iter().flatten() {
                worker.unpark();
            }
        }
        IN_TEAM.with(|c| c.set(true));
        self.take_tasks();
        IN_TEAM.with(|c| c.set(false));
        wait_until(|| self.remaining.load(Ordering::Acquire) == 0);
        self.generation.store(open + 1, Ordering::SeqCst);
        wait_until(|| self.inside.load(Ordering::SeqCst) == 0);
        // SAFETY: as above; drop the erased pointer.
        unsafe { *self.job.get() = (None, 0) };
        let panic = self.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(payload) = panic {
            self.busy.store(false, Ordering::Release);
            resume_unwind(payload);
        }
    }

    /// Takes and runs tasks of the open loop until none is left.
    fn take_tasks(&self) {
        // SAFETY: called by the owner, or by a worker counted in `inside` that saw the
        // loop open after announcing itself: `job` stays valid until it leaves.
        let (f, tasks) = unsafe { *self.job.get() };
        let Some(f) = f else { return };
        // SAFETY: as above.
        let f = unsafe { &*f };
        let profiling = PROFILING.load(Ordering::Relaxed);
        let mut busy_ns = 0;
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= tasks {
                break;
            }
            let started = profiling.then(Instant::now);
            if let Err(payload) = catch_unwind(AssertUnwindSafe(|| f(i))) {
                let mut slot = self.panic.lock().unwrap_or_else(|e| e.into_inner());
                slot.get_or_insert(payload);
            }
            if let Some(started) = started {
                busy_ns += elapsed_ns(started);
            }
            self.remaining.fetch_sub(1, Ordering::Release);
        }
        if busy_ns > 0 {
            PROFILE_BUSY_NS.fetch_add(busy_ns, Ordering::Relaxed);
        }
    }

    /// A worker's life: wait for each loop (spinning, then parked), help with it.
    fn work(&self) {
        IN_TEAM.with(|c| c.set(true));
        let mut seen = 0;
        loop {
            let open = self.wait_for_loop(seen);
            seen = open;
            self.inside.fetch_add(1, Ordering::SeqCst);
            // Announced before this check: if the loop is still open now, its owner
            // waits for us before it closes `job`.
            if self.generation.load(Ordering::SeqCst) == open {
                self.take_tasks();
            }
            self.inside.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Waits until a loop other than `seen` is open and returns its generation.
    fn wait_for_loop(&self, seen: u64) -> u64 {
        let is_new = |g: u64| g % 2 == 1 && g != seen;
        let mut since = Instant::now();
        let mut spins = 0u32;
        loop {
            let g = self.generation.load(Ordering::Acquire);
            if is_new(g) {
                return g;
            }
            spins = spins.wrapping_add(1);
            pause(spins);
            if spins.is_multiple_of(256) && since.elapsed() > SPIN {
                self.parked.fetch_add(1, Ordering::SeqCst);
                // Announced before this check: a loop opened after it sees `parked`
                // and unparks us.
                let g = self.generation.load(Ordering::SeqCst);
                if !is_new(g) {
                    thread::park();
                }
                self.parked.fetch_sub(1, Ordering::SeqCst);
                since = Instant::now();
            }
        }
    }
}

/// Spins until `done()`; see [`pause`].
fn wait_until(done: impl Fn() -> bool) {
    let mut spins = 0u32;
    while !done() {
        spins = spins.wrapping_add(1);
        pause(spins);
    }
}

/// One wait of a spin loop: a CPU pause, and every [`YIELD_EVERY`]th time a yield of
/// the core, so that a team thread that was descheduled mid-task (more runnable
/// threads than cores) gets the core back soon instead of after a time slice.
#[inline]
fn pause(spins: u32) {
    if spins.is_multiple_of(YIELD_EVERY) {
        thread::yield_now();
    } else {
        std::hint::spin_loop();
    }
}

/// Spin-loop pauses between yields (~100 µs). A/B, 8 V2-Lite layers at q8, three runs
/// each: 23.6 ms a decode step against 24.6 with a yield every 256 pauses.
const YIELD_EVERY: u32 = 4096;

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_task_runs_once() {
        for tasks in [0, 1, 2, 3, 17, 1000] {
            let counts: Vec<AtomicU32> = (0..tasks).map(|_| AtomicU32::new(0)).collect();
            for_each(tasks, |i| {
                counts[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(
                counts.iter().all(|c| c.load(Ordering::Relaxed) == 1),
                "{tasks} tasks"
            );
        }
    }

    #[test]
    fn decode_tasks_are_long_capped_and_aligned() {
        // V2-Lite's bf16 head (4 KB rows): capped at 4 MB, 1024 rows.
        assert_eq!(decode_task_len(102_400, 4096, 2, 2, 8), 1024);
        // A q8 expert matrix (88 tiles of 33 KB): one task per thread.
        assert_eq!(decode_task_len(88, 33 * 1024, 2, 1, 1), 44);
        // Two per thread, rounded up to the tile (1408 rows of 4 KB, tiles of 6 rows).
        assert_eq!(decode_task_len(1408, 4096, 2, 2, 6), 354);
        // Fewer items than the alignment: one aligned task.
        assert_eq!(decode_task_len(3, 4096, 2, 2, 8), 8);
    }

    #[test]
    fn loops_after_parking_and_nested_loops() {
        let total = AtomicUsize::new(0);
        for round in 0..50 {
            if round % 10 == 0 {
                // Long enough for the workers to park.
                thread::sleep(SPIN * 3);
            }
            for_each(8, |_| {
                for_each(4, |_| {
                    total.fetch_add(1, Ordering::Relaxed);
                });
            });
        }
        assert_eq!(total.load(Ordering::Relaxed), 50 * 8 * 4);
    }

    #[test]
    fn concurrent_callers_each_get_every_task() {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                thread::spawn(|| {
                    let mut data = vec![0u64; 4099];
                    for _ in 0..200 {
                        for_each_chunk_mut(&mut data, 64, |i, chunk| {
                            for (j, v) in chunk.iter_mut().enumerate() {
                                *v += (i * 64 + j) as u64;
                            }
                        });
                    }
                    data.iter().enumerate().all(|(j, &v)| v == 200 * j as u64)
                })
            })
            .collect();
        assert!(handles.into_iter().all(|h| h.join().unwrap()));
    }

    #[test]
    fn a_profile_counts_each_site_and_the_work_between() {
        profile_start();
        let spread = Location::caller();
        for _ in 0..3 {
            for_each(8, |_| std::hint::black_box(()));
        }
        thread::sleep(Duration::from_millis(2));
        let serial = Location::caller();
        for_each(1, |_| thread::sleep(Duration::from_millis(1)));
        let profile = profile_take();
        // Spread or serial (another test's loop may hold the team), summed.
        let site = |loc: &Location, below: u32| {
            let mut sum = None::<LoopSite>;
            for s in &profile.sites {
                if s.site.file() == loc.file() && s.site.line() == loc.line() + below {
                    match &mut sum {
                        Some(sum) => sum.add(s),
                        None => sum = Some(*s),
                    }
                }
            }
            sum.unwrap_or_else(|| panic!("no site below {loc} in {profile:?}"))
        };
        let (a, b) = (site(spread, 2), site(serial, 1));
        assert_eq!((a.loops, a.tasks, b.loops, b.tasks), (3, 24, 1, 1));
        assert!(b.loop_s >= 1e-3 && b.before_s >= 2e-3, "{b:?}");
        // Nothing is timed once taken.
        for_each(8, |_| ());
        assert!(profile_take().sites.is_empty());
    }

    #[test]
    fn a_panicking_task_is_reraised_after_the_loop() {
        let done = AtomicUsize::new(0);
        let result = catch_unwind(AssertUnwindSafe(|| {
            for_each(64, |i| {
                if i == 5 {
                    panic!("task 5 failed");
                }
                done.fetch_add(1, Ordering::Relaxed);
            })
        }));
        assert!(result.is_err());
        assert_eq!(done.load(Ordering::Relaxed), 63);
        // The team still works afterwards.
        let n = AtomicUsize::new(0);
        for_each(10, |_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 10);
    }
}
