//! Channels between tasks of one worker thread.
//!
//! A session and the backend connections it uses run on the same thread, so
//! handing a request over or a reply back needs no atomics: these channels
//! are `Rc` and `Cell` where tokio's are `Arc` and atomic read-modify-writes
//! (measured: tokio's oneshot plus its unbounded queue were ≈10% of the
//! proxy's user-space instructions per request). They are `!Send` by
//! construction; anything that crosses threads (the response cache's single
//! flight) keeps using tokio's.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

/// Why a receiver got nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryRecvError {
    /// Nothing yet; the sender is still there.
    Empty,
    /// The sender is gone without sending.
    Closed,
}

/// The sender went away without sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvError;

struct OneshotCell<T> {
    value: Cell<Option<T>>,
    waker: Cell<Option<Waker>>,
    /// The sender sent or was dropped.
    done: Cell<bool>,
}

/// Sends one value to a [`Receiver`] on the same thread.
pub struct Sender<T>(Option<Rc<OneshotCell<T>>>);

/// Receives the one value of a [`Sender`]: awaited, or polled with [`Receiver::try_recv`].
pub struct Receiver<T>(Rc<OneshotCell<T>>);

/// A one-value channel.
pub fn oneshot<T>() -> (Sender<T>, Receiver<T>) {
    let cell = Rc::new(OneshotCell {
        value: Cell::new(None),
        waker: Cell::new(None),
        done: Cell::new(false),
    });
    (Sender(Some(cell.clone())), Receiver(cell))
}

impl<T> Sender<T> {
    /// Delivers the value and wakes the receiver if it is waiting.
    pub fn send(mut self, value: T) {
        if let Some(cell) = self.0.take() {
            cell.value.set(Some(value));
            cell.done.set(true);
            if let Some(w) = cell.waker.take() {
                w.wake();
            }
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        if let Some(cell) = self.0.take() {
            cell.done.set(true);
            if let Some(w) = cell.waker.take() {
                w.wake();
            }
        }
    }
}

impl<T> Receiver<T> {
    /// The value if it has arrived.
    pub fn try_recv(&mut self) -> Result<T, TryRecvError> {
        match self.0.value.take() {
            Some(v) => Ok(v),
            None if self.0.done.get() => Err(TryRecvError::Closed),
            None => Err(TryRecvError::Empty),
        }
    }
}

impl<T> Future for Receiver<T> {
    type Output = Result<T, RecvError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        match this.try_recv() {
            Ok(v) => Poll::Ready(Ok(v)),
            Err(TryRecvError::Closed) => Poll::Ready(Err(RecvError)),
            Err(TryRecvError::Empty) => {
                // Keep the registered waker when it would wake the same task (the common case).
                let w = this.0.waker.take();
                this.0.waker.set(Some(match w {
                    Some(w) if w.will_wake(cx.waker()) => w,
                    _ => cx.waker().clone(),
                }));
                Poll::Pending
            }
        }
    }
}

struct QueueInner<T> {
    items: RefCell<VecDeque<T>>,
    waker: Cell<Option<Waker>>,
    /// Live [`QueueSender`]s.
    senders: Cell<usize>,
}

/// The sending side of an unbounded queue on one thread; cloned freely.
pub struct QueueSender<T>(Rc<QueueInner<T>>);

/// The receiving side of a [`QueueSender`]: ends (yields `None`) when every sender is gone
/// and the queue is empty.
pub struct QueueReceiver<T>(Rc<QueueInner<T>>);

/// An unbounded queue with one receiver.
pub fn queue<T>() -> (QueueSender<T>, QueueReceiver<T>) {
    let inner = Rc::new(QueueInner {
        items: RefCell::new(VecDeque::new()),
        waker: Cell::new(None),
        senders: Cell::new(1),
    });
    (QueueSender(inner.clone()), QueueReceiver(inner))
}

impl<T> QueueSender<T> {
    /// Appends an item and wakes the receiver if it waits. Waking an already woken task is
    /// skipped: the waker is taken on the first push and registered again by the next poll.
    pub fn push(&self, item: T) {
        self.0.items.borrow_mut().push_back(item);
        if let Some(w) = self.0.waker.take() {
            w.wake();
        }
    }
}

impl<T> Clone for QueueSender<T> {
    fn clone(&self) -> Self {
        self.0.senders.set(self.0.senders.get() + 1);
        QueueSender(self.0.clone())
    }
}

impl<T> Drop for QueueSender<T> {
    fn drop(&mut self) {
        let n = self.0.senders.get().saturating_sub(1);
        self.0.senders.set(n);
        if n == 0 {
            if let Some(w) = self.0.waker.take() {
                w.wake();
            }
        }
    }
}

impl<T> QueueReceiver<T> {
    /// The next item if there is one now.
    pub fn try_recv(&mut self) -> Option<T> {
        self.0.items.borrow_mut().pop_front()
    }

    /// Waits for the next item; `None` once every sender is gone and nothing is left.
    pub fn recv(&mut self) -> impl Future<Output = Option<T>> + '_ {
        std::future::poll_fn(move |cx| self.poll_recv(cx))
    }

    /// Polls for the next item.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        if let Some(item) = self.0.items.borrow_mut().pop_front() {
            return Poll::Ready(Some(item));
        }
        if self.0.senders.get() == 0 {
            return Poll::Ready(None);
        }
        let w = self.0.waker.take();
        self.0.waker.set(Some(match w {
            Some(w) if w.will_wake(cx.waker()) => w,
            _ => cx.waker().clone(),
        }));
        Poll::Pending
    }

    /// Drops every queued item (after the senders are gone, to fail what was left).
    pub fn drain(&mut self) -> Vec<T> {
        self.0.items.borrow_mut().drain(..).collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    #[test]
    fn oneshot_delivers_once_and_reports_a_dropped_sender() {
        let (tx, mut rx) = oneshot::<u32>();
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
        tx.send(7);
        assert_eq!(rx.try_recv(), Ok(7));
        assert_eq!(rx.try_recv(), Err(TryRecvError::Closed));
        let (tx, mut rx) = oneshot::<u32>();
        drop(tx);
        assert_eq!(rx.try_recv(), Err(TryRecvError::Closed));
    }

    #[test]
    fn awaiting_wakes_on_send_and_on_drop() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async {
            let (tx, rx) = oneshot::<u32>();
            tokio::task::spawn_local(async move {
                tokio::task::yield_now().await;
                tx.send(3);
            });
            assert_eq!(rx.await, Ok(3));
            let (tx, rx) = oneshot::<u32>();
            tokio::task::spawn_local(async move {
                tokio::task::yield_now().await;
                drop(tx);
            });
            assert_eq!(rx.await, Err(RecvError));
            let (tx, mut q) = queue::<u32>();
            let tx2 = tx.clone();
            tokio::task::spawn_local(async move {
                tokio::task::yield_now().await;
                tx2.push(1);
                tx2.push(2);
            });
            assert_eq!(q.recv().await, Some(1));
            assert_eq!(q.try_recv(), Some(2));
            drop(tx);
            assert_eq!(q.recv().await, None);
        });
    }
}
