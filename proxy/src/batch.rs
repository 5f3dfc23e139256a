//! Passes a streamed backend body on in batches: what has arrived is written to
//! the client in one piece rather than one chunk at a time.
//!
//! A backend's chunked body comes one chunk at a time (hyper's HTTP/2 body and
//! [`crate::h1`]'s decoder alike), and the front end writes and flushes
//! whenever the body has nothing ready. An SSE stream whose events arrive
//! together (one read of the backend's socket holds many) would cost one
//! `writev` per event: measured with 64-event streams in a closed loop, the
//! kernel was two thirds of the proxy's time. nginx reads what is there and
//! writes it at once; so does this adapter. When the next chunk is not ready,
//! it lets the runtime run the other tasks and only then passes on what it
//! holds, so that bytes landing meanwhile go in the same write. A chunk is
//! never held back waiting for the network.

use axum::body::Bytes;
use futures_util::Stream;
use std::pin::Pin;
use std::task::{Context, Poll};

/// At most this much is held before it is passed on, so a long burst goes out
/// as it comes rather than all at the end.
const MAX_BATCH_BYTES: usize = 64 * 1024;

/// The runtime's turns given to the other tasks before what is held is passed
/// on. Chosen when hyper's client connection decoded the backend's chunks on a
/// task of its own and handed the next one over on the second turn (with one
/// turn every batch held one chunk); [`crate::h1`] now decodes what was read
/// in place, so the turns only give the backend's next write time to land. A
/// turn costs a poll of this task, a microsecond or so, against a `writev` per
/// chunk.
const TURNS: u8 = 2;

pub struct Batched<S, E> {
    inner: S,
    held: Vec<Bytes>,
    held_bytes: usize,
    /// The turns the runtime was given since the last chunk came.
    yielded: u8,
    /// The inner stream's end or error, once it came, passed on after what is held.
    last: Option<Option<E>>,
    /// Whether the end (or the error that ends the stream) was passed on.
    finished: bool,
}

impl<S, E> Batched<S, E> {
    pub fn new(inner: S) -> Batched<S, E> {
        Batched { inner, held: Vec::new(), held_bytes: 0, yielded: 0, last: None, finished: false }
    }

    /// What is held, as one piece (copied only when there is more than one chunk).
    fn take(&mut self) -> Bytes {
        self.held_bytes = 0;
        self.yielded = 0;
        match self.held.len() {
            1 => self.held.pop().expect("one chunk"),
            _ => {
                let mut all = Vec::with_capacity(self.held.iter().map(Bytes::len).sum());
                for chunk in self.held.drain(..) {
                    all.extend_from_slice(&chunk);
                }
                Bytes::from(all)
            }
        }
    }
}

impl<S, E> Stream for Batched<S, E>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: Unpin,
{
    type Item = Result<Bytes, E>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if this.finished {
                return Poll::Ready(None);
            }
            if let Some(last) = this.last.take() {
                if !this.held.is_empty() {
                    this.last = Some(last);
                    return Poll::Ready(Some(Ok(this.take())));
                }
                this.finished = true;
                return Poll::Ready(last.map(Err));
            }
            match Pin::new(&mut this.inner).poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    this.held_bytes += chunk.len();
                    this.held.push(chunk);
                    this.yielded = 0;
                    if this.held_bytes >= MAX_BATCH_BYTES {
                        return Poll::Ready(Some(Ok(this.take())));
                    }
                }
                Poll::Ready(Some(Err(e))) => this.last = Some(Some(e)),
                Poll::Ready(None) => this.last = Some(None),
                Poll::Pending if this.held.is_empty() => return Poll::Pending,
                Poll::Pending if this.yielded < TURNS => {
                    // A turn for the other tasks; after TURNS of them, whatever came is passed on.
                    this.yielded += 1;
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Poll::Pending => return Poll::Ready(Some(Ok(this.take()))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    /// A scripted inner stream: `Some(Ok)` a chunk, `Some(Err)` an error, `None`
    /// one `Pending` (waking itself, as a channel would when the next is sent).
    fn scripted(script: Vec<Option<Result<&'static str, u8>>>) -> impl Stream<Item = Result<Bytes, u8>> + Unpin {
        let mut script = script.into_iter();
        futures_util::stream::poll_fn(move |cx| match script.next() {
            Some(Some(item)) => Poll::Ready(Some(item.map(|s| Bytes::from_static(s.as_bytes())))),
            Some(None) => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            None => Poll::Ready(None),
        })
    }

    /// Everything `stream` passes on, polled until it ends.
    fn drain<S: Stream<Item = Result<Bytes, u8>> + Unpin>(mut stream: S) -> Vec<Result<Bytes, u8>> {
        let mut got = Vec::new();
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        for _ in 0..1000 {
            match stream.poll_next_unpin(&mut cx) {
                Poll::Ready(Some(item)) => got.push(item),
                Poll::Ready(None) => return got,
                Poll::Pending => {}
            }
        }
        panic!("the stream did not end");
    }

    /// What the client gets from the scripted stream, as text or errors.
    fn check(script: Vec<Option<Result<&'static str, u8>>>, expected: &[Result<&str, u8>]) {
        let got: Vec<Result<String, u8>> = drain(Batched::new(scripted(script)))
            .into_iter()
            .map(|item| item.map(|b| String::from_utf8(b.to_vec()).expect("utf-8")))
            .collect();
        let expected: Vec<Result<String, u8>> = expected.iter().map(|e| e.map(str::to_owned)).collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn chunks_ready_together_go_out_together_and_in_order() {
        // Ready one after the other, with the runtime given a turn or two between.
        check(vec![Some(Ok("a")), Some(Ok("b")), None, Some(Ok("c")), None, None, Some(Ok("d"))], &[Ok("abcd")]);
        // What is held is passed on once TURNS turns brought nothing, not held for the next.
        check(vec![Some(Ok("a")), None, None, None, Some(Ok("b"))], &[Ok("a"), Ok("b")]);
        check(vec![Some(Ok("a")), None, None, None, None, Some(Ok("b")), None, Some(Ok("c"))], &[Ok("a"), Ok("bc")]);
        // An error comes after the data that came before it, then the stream ends.
        check(vec![Some(Ok("a")), Some(Ok("b")), Some(Err(7)), Some(Ok("never"))], &[Ok("ab"), Err(7)]);
        check(vec![Some(Err(7))], &[Err(7)]);
        check(vec![], &[]);
    }

    #[test]
    fn a_long_burst_goes_out_in_bounded_pieces() {
        let burst = futures_util::stream::iter((0..200).map(|_| Ok::<_, u8>(Bytes::from(vec![b'x'; 1024]))));
        let sizes: Vec<usize> = drain(Batched::new(burst)).into_iter().map(|b| b.expect("data").len()).collect();
        assert_eq!(sizes, vec![64 * 1024, 64 * 1024, 64 * 1024, 8 * 1024]);
    }
}
