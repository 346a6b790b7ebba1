//! Hashing a text written in blocks by several threads, in block order.
//!
//! Every thread takes the next unwritten block, writes it, and leaves it in the block's slot;
//! whichever thread leaves the block that SHA-256 needs next feeds it, and every following
//! block already written, to the one hasher. So all threads write text and the hashing, which
//! must be sequential, moves between them instead of waiting on one thread; no thread runs
//! more than [`WINDOW`] blocks ahead of the hasher, which bounds the memory.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::thread;

use sha2::{Digest, Sha256};

use super::text::Text;

/// Blocks written but not yet hashed, at most.
const WINDOW: usize = 8;

/// What the threads share.
struct Shared {
    /// The block the hasher needs next.
    next: usize,
    /// Written blocks from `next` on (`None`: not written yet).
    ready: VecDeque<Option<Text>>,
    /// The hasher, when no thread is feeding it.
    hasher: Option<Sha256>,
    /// Buffers of hashed blocks, to write further blocks into.
    spare: Vec<Text>,
    /// Threads waiting for the hasher to catch up (woken only when there are some).
    waiting: usize,
}

/// SHA-256 of the concatenated texts of `blocks` blocks, block `i` written by `write(i, text)`
/// (into an empty `text`), on `threads` threads.
pub fn ordered_digest(
    blocks: usize,
    threads: usize,
    write: impl Fn(usize, &mut Text) + Sync,
) -> [u8; 32] {
    if threads <= 1 || blocks <= 1 {
        let mut hasher = Sha256::new();
        let mut text = Text::default();
        for index in 0..blocks {
            text.clear();
            write(index, &mut text);
            hasher.update(text.as_bytes());
        }
        return hasher.finalize().into();
    }
    let claimed = AtomicUsize::new(0);
    let shared = Mutex::new(Shared {
        next: 0,
        ready: VecDeque::new(),
        hasher: Some(Sha256::new()),
        spare: Vec::new(),
        waiting: 0,
    });
    let hashed = Condvar::new();
    let work = || loop {
        let index = claimed.fetch_add(1, Ordering::Relaxed);
        if index >= blocks {
            return;
        }
        let mut text = {
            let mut state = shared.lock().expect("no thread panics");
            while index >= state.next + WINDOW {
                state.waiting += 1;
                state = hashed.wait(state).expect("no thread panics");
                state.waiting -= 1;
            }
            state.spare.pop().unwrap_or_default()
        };
        text.clear();
        write(index, &mut text);
        let mut state = shared.lock().expect("no thread panics");
        let slot = index - state.next;
        if state.ready.len() <= slot {
            state.ready.resize_with(slot + 1, || None);
        }
        state.ready[slot] = Some(text);
        // Feed the hasher while the block it needs is written, unless another thread is.
        if let Some(mut hasher) = state.hasher.take() {
            while matches!(state.ready.front(), Some(Some(_))) {
                let text = state.ready.pop_front().flatten().expect("just checked");
                // `ready` starts at `next`: move both before other threads see them.
                state.next += 1;
                drop(state);
                hasher.update(text.as_bytes());
                state = shared.lock().expect("no thread panics");
                state.spare.push(text);
                if state.waiting > 0 {
                    hashed.notify_all();
                }
            }
            state.hasher = Some(hasher);
        }
    };
    thread::scope(|scope| {
        for _ in 1..threads {
            scope.spawn(work);
        }
        work();
    });
    let state = shared.into_inner().expect("no thread panics");
    debug_assert!(state.next == blocks && state.ready.is_empty());
    state
        .hasher
        .expect("every block is hashed")
        .finalize()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    /// Block `i`'s text: its number and a length that varies from block to block.
    fn block_text(index: usize) -> Vec<u8> {
        format!("<{index}:{}>", "x".repeat(index * 7919 % 50)).into_bytes()
    }

    fn whole_text(blocks: usize) -> Vec<u8> {
        (0..blocks).flat_map(block_text).collect()
    }

    #[test]
    fn blocks_are_hashed_in_order_whatever_order_they_are_written_in() {
        for threads in [1, 2, 3, 5] {
            for blocks in [0, 1, 2, 7, WINDOW + 1, 64] {
                let digest = ordered_digest(blocks, threads, |index, text| {
                    // Early blocks take longest, so later ones are written first.
                    if index < 3 && threads > 1 {
                        thread::sleep(Duration::from_millis(3 - index as u64));
                    }
                    text.push(&block_text(index));
                });
                let expected: [u8; 32] = Sha256::digest(whole_text(blocks)).into();
                assert_eq!(digest, expected, "{blocks} blocks on {threads} threads");
            }
        }
    }

    #[test]
    fn no_block_is_written_more_than_a_window_ahead_of_the_hasher() {
        let first_written = AtomicBool::new(false);
        let furthest = AtomicUsize::new(0);
        ordered_digest(200, 4, |index, text| {
            if index == 0 {
                // The other threads could write every other block meanwhile; they must wait.
                thread::sleep(Duration::from_millis(30));
                first_written.store(true, Ordering::SeqCst);
            } else if !first_written.load(Ordering::SeqCst) {
                furthest.fetch_max(index, Ordering::SeqCst);
            }
            text.push(&block_text(index));
        });
        assert!(furthest.load(Ordering::SeqCst) < WINDOW);
    }
}
