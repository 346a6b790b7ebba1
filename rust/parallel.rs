//! Running independent pieces of work on a few threads.

use std::sync::Mutex;
use std::thread;

/// Below this much work (multiply-adds, values read, ...) everything runs on the calling
/// thread: starting threads costs more than it saves.
pub const PARALLEL_MIN_WORK: usize = 1 << 20;

/// How many threads `work` units deserve: one below [`PARALLEL_MIN_WORK`], else as many as
/// this process may run on (its CPU affinity, so a process pinned to one core gets one).
pub fn threads_for(work: usize) -> usize {
    if work < PARALLEL_MIN_WORK {
        1
    } else {
        available_threads()
    }
}

/// How many threads this process may run at once (its CPU affinity).
pub fn available_threads() -> usize {
    thread::available_parallelism().map_or(1, usize::from)
}

/// Apply `f` to every item, on `threads` threads (the calling thread among them), each thread
/// taking the next item in order as it becomes free.
pub fn for_each<T: Send>(items: Vec<T>, threads: usize, f: impl Fn(T) + Sync) {
    for_each_with(items, threads, || (), |(), item| f(item));
}

/// [`for_each`] with a value that each thread makes once with `init` and lends to `f` for every
/// item it takes (a scratch buffer, say, allocated once per thread rather than once per item).
pub fn for_each_with<T: Send, S>(
    items: Vec<T>,
    threads: usize,
    init: impl Fn() -> S + Sync,
    f: impl Fn(&mut S, T) + Sync,
) {
    if threads <= 1 || items.len() <= 1 {
        let mut state = init();
        items.into_iter().for_each(|item| f(&mut state, item));
        return;
    }
    let workers = threads.min(items.len());
    let queue = Mutex::new(items.into_iter());
    let next = || queue.lock().expect("no worker panics").next();
    let work = || {
        let mut state = init();
        while let Some(item) = next() {
            f(&mut state, item);
        }
    };
    thread::scope(|scope| {
        for _ in 1..workers {
            scope.spawn(work);
        }
        work();
    });
}

/// Split `len` elements that each cost `cost` work units into ranges of whole `align`-element
/// multiples, small enough that `threads` threads share `total` work evenly, but each worth at
/// least [`MIN_PIECE_WORK`]; one range when `threads` is 1.
pub fn pieces(
    len: usize,
    cost: usize,
    total: usize,
    threads: usize,
    align: usize,
) -> impl Iterator<Item = std::ops::Range<usize>> {
    let piece = if threads <= 1 {
        len.max(1)
    } else {
        let target = (total / (threads * PIECES_PER_THREAD)).max(MIN_PIECE_WORK);
        target.div_ceil(cost.max(1)).div_ceil(align).max(1) * align
    };
    (0..len)
        .step_by(piece)
        .map(move |start| start..(start + piece).min(len))
}

/// Pieces per thread that [`pieces`] aims at: enough for the threads to even out.
const PIECES_PER_THREAD: usize = 8;

/// The least work worth handing to a thread on its own.
pub const MIN_PIECE_WORK: usize = 1 << 16;

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn every_item_is_processed_once_on_any_number_of_threads() {
        for threads in [1, 2, 3, 8] {
            let seen: Vec<AtomicUsize> = (0..100).map(|_| AtomicUsize::new(0)).collect();
            for_each((0..100).collect(), threads, |i: usize| {
                seen[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(seen.iter().all(|count| count.load(Ordering::Relaxed) == 1));
        }
    }

    #[test]
    fn pieces_cover_the_range_in_aligned_steps() {
        let ranges: Vec<_> = pieces(100_003, 1000, 100_003 * 1000, 2, 64).collect();
        assert_eq!(ranges.first().map(|r| r.start), Some(0));
        assert_eq!(ranges.last().map(|r| r.end), Some(100_003));
        assert!(ranges.windows(2).all(|w| w[0].end == w[1].start));
        assert!(ranges[..ranges.len() - 1]
            .iter()
            .all(|r| r.len() % 64 == 0 && r.len() * 1000 >= MIN_PIECE_WORK));
        assert!(ranges.len() >= 2 * PIECES_PER_THREAD);
        let whole: Vec<_> = pieces(10, 5, 50, 1, 64).collect();
        assert_eq!((whole.len(), whole[0].clone()), (1, 0..10));
        assert_eq!(pieces(0, 5, 0, 2, 64).count(), 0);
    }
}
