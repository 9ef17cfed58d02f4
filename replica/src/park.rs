//! Waiting for a future on a plain thread by parking it.
//!
//! The block store's blocking API is a wait on its async path (scheduled requests,
//! locks that async tasks also take). [`block_on`] polls the future on the calling
//! thread and parks between polls; the future's waker unparks it. Unlike tokio's
//! `blocking_recv`/`blocking_lock`, it never panics inside a runtime context, so code
//! paths shared by tests and the daemon work from any thread. The caller's own work
//! must not be what resolves the future: not a runtime worker whose tasks are needed,
//! not a data-plane shard (only that thread reaps its ring).

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};

/// Wakes a parked thread.
struct ThreadWaker(Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

thread_local! {
    /// One waker per thread, so a blocking wait allocates nothing.
    static THREAD_WAKER: Waker = Waker::from(Arc::new(ThreadWaker(thread::current())));
}

/// Drives `fut` to completion on the calling thread, parking between polls.
pub(crate) fn block_on<F: Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    THREAD_WAKER.with(|waker| {
        let mut cx = Context::from_waker(waker);
        loop {
            if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
                return v;
            }
            // Spurious unparks just poll again.
            thread::park();
        }
    })
}
