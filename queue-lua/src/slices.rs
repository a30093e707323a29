//! Time slices and deadlines for the Lua code of one state (docs/consumers.md,
//! "Handler time limits").
//!
//! Many handler coroutines share a Lua state and its thread. A coroutine that
//! computes without waiting for anything (a long loop, `while true do end`) would hold
//! that thread until it ends, stalling every other handler on the state and the
//! runtime's shutdown. A hook that Lua calls every [`CHECK_EVERY`] instructions
//! looks at what is running now:
//!
//! - past its **slice** ([`SLICE`]), a coroutine yields to the async executor, which
//!   runs the other handlers before resuming it; a coroutine the handler created
//!   yields too, and the sandbox's `coroutine.resume` passes that yield on up to the
//!   handler's coroutine and resumes it again once that is resumed, so the Lua code
//!   that resumed it sees nothing of it;
//! - past its **deadline** (a consumer's `timeout`, a file's load time), the
//!   handler's coroutine is ended with the deadline's error, which fails the handler
//!   (or the load) like any other error. The sandbox's `pcall`, `xpcall` and `coroutine.resume` raise it again past the
//!   deadline ([`Clock::overdue`]), so code that catches errors in a loop cannot
//!   outlive its deadline.
//!
//! Nothing runs in the hook while no slice is set, so Rust that calls into Lua outside
//! a slice (tests, `check`) pays only the hook's call.

use std::cell::{Cell, RefCell};
use std::ffi::c_void;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use mlua::{Function, HookTriggers, Lua, Thread, VmState};

use crate::context::DeliveryState;

/// How often (in Lua instructions) the hook runs: about every 20 to 100 µs of Lua.
pub(crate) const CHECK_EVERY: u32 = 10_000;

/// How long a coroutine computes before it lets the others run.
pub const SLICE: Duration = Duration::from_millis(5);

/// A point in time the running code must not pass, and what to say when it does.
/// Cheap to clone: each poll of a coroutine under a deadline hands it to the hook.
#[derive(Clone, Debug)]
pub(crate) struct Deadline {
    pub at: Instant,
    pub message: Rc<str>,
}

impl Deadline {
    /// A deadline `limit` from now.
    pub fn after(limit: Duration, message: impl Into<Rc<str>>) -> Deadline {
        Deadline {
            at: queue_core::deadline_after(limit).into_std(),
            message: message.into(),
        }
    }
}

/// What is running on the state right now.
struct Slice {
    /// The coroutine that yields when its slice is over, by address (none: nothing
    /// yields, as for a file's top level, which is not a coroutine). An address, not a
    /// `Thread`: cloning one per poll costs a registry slot.
    yields: Option<*const c_void>,
    /// When the slice ends: set by the hook's first look at the clock, so that a poll
    /// that never reaches the hook (most handler runs) does not read the clock. The
    /// slice is thereby up to one hook interval longer than [`SLICE`].
    ends: Option<Instant>,
    deadline: Option<Deadline>,
    /// The thread last told to yield past the deadline, by address.
    yield_tried: Option<*const c_void>,
    /// A coroutine the handler created that yielded at the slice's end, by address:
    /// the sandbox's `coroutine.resume` passes its yield on up ([`Clock::end_resume`]).
    nested_yield: Option<*const c_void>,
    /// The coroutines the sandbox's `coroutine.resume` is resuming now, innermost
    /// last: only the innermost may yield at the slice's end, since only its resumer
    /// passes the yield on. Another coroutine running Lua (one `coroutine.close` runs
    /// the `__close` handlers of, one of mlua's own) must not yield: a yield there
    /// is thrown as an error, or taken for a value. Held, not by address: the
    /// watchdog's signal handler sets the hook on the innermost one
    /// ([`crate::preempt::resuming`]), so it must stay alive until it is taken off
    /// here, even when an error skips its resume's end.
    resuming: Vec<Thread>,
}

/// The state's clock: what is running, read by the hook. One per Lua state.
#[derive(Default)]
pub(crate) struct Clock {
    running: RefCell<Option<Slice>>,
    /// Handler coroutines run without the hook until their slice is over
    /// ([`crate::preempt`]).
    pub(crate) preempts: Cell<bool>,
    /// The state is about to be dropped with every run on it
    /// ([`crate::LuaHost::closing`]).
    pub(crate) closing: Cell<bool>,
    /// When the current [`CLOSE_WINDOW`] began, and the `__close` time spent in it.
    close_window: Cell<Option<(Instant, Duration)>>,
}

impl Clock {
    /// Installs the hook on `lua` (before any coroutine exists, so that every
    /// coroutine, including those Lua code creates, inherits it).
    pub fn install(lua: &Lua) -> mlua::Result<Rc<Clock>> {
        let clock = Rc::new(Clock::default());
        let seen = Rc::clone(&clock);
        lua.set_global_hook(
            HookTriggers::new().every_nth_instruction(CHECK_EVERY),
            move |lua, _| seen.check(lua),
        )?;
        // Once the state has its hook: the watchdog sets that same hook.
        clock.preempts.set(crate::preempt::available(lua));
        Ok(clock)
    }

    /// How long the `__close` handlers of a coroutine abandoned `now` may run:
    /// [`CLOSE_TIME`], or what is left of [`CLOSE_BUDGET`] in this window.
    fn close_time(&self, now: Instant) -> Duration {
        let spent = match self.close_window.get() {
            Some((began, spent)) if now.duration_since(began) < CLOSE_WINDOW => spent,
            _ => {
                self.close_window.set(Some((now, Duration::ZERO)));
                Duration::ZERO
            }
        };
        CLOSE_TIME.min(CLOSE_BUDGET.saturating_sub(spent))
    }

    /// Counts the `__close` time of a coroutine abandoned at `began` against the
    /// window's budget.
    fn closed(&self, began: Instant) {
        if let Some((window, spent)) = self.close_window.get() {
            self.close_window
                .set(Some((window, spent.saturating_add(began.elapsed()))));
        }
    }

    /// Takes the hook off a handler's coroutine that is not running, when its slice
    /// can end without it ([`crate::preempt`]): every instruction it runs is then
    /// cheaper. Called for new coroutines and for those whose run returned.
    pub fn unhook(&self, thread: &Thread) {
        if self.preempts.get() {
            thread.remove_hook();
        }
    }

    /// Puts the hook back on a handler's coroutine that [`Clock::unhook`] took it off.
    pub fn hook(&self, thread: &Thread) {
        if self.preempts.get() {
            crate::preempt::hook(thread);
        }
    }

    fn check(&self, lua: &Lua) -> mlua::Result<VmState> {
        let mut running = self.running.borrow_mut();
        let Some(slice) = running.as_mut() else {
            return Ok(VmState::Continue);
        };
        let now = Instant::now();
        if let Some(deadline) = &slice.deadline
            && now >= deadline.at
        {
            // Past the deadline, a yield first: the slice's owner (a `Sliced` future)
            // then ends the coroutine. An error raised here would run the function's
            // `__close` handlers with hooks off (one that loops would never end), so
            // it is the fallback, for where Lua cannot yield (the same thread is
            // back here) or where nothing waits for a yield (a file's top level).
            let current = lua.current_thread().to_pointer();
            if slice.yields.is_some() && slice.yield_tried != Some(current) {
                slice.yield_tried = Some(current);
                return Ok(VmState::Yield);
            }
            return Err(mlua::Error::runtime(&*deadline.message));
        }
        let ends = *slice.ends.get_or_insert(now + SLICE);
        // The watchdog set the hook because the slice is over (`crate::preempt`).
        let over = now >= ends || crate::preempt::slice_overran();
        if !over || slice.yields.is_none() {
            return Ok(VmState::Continue);
        }
        let current = lua.current_thread().to_pointer();
        if slice.yields == Some(current) {
            return Ok(VmState::Yield);
        }
        // A coroutine the handler created yields too, when the sandbox's
        // `coroutine.resume` is what runs it: that passes the yield on to the
        // handler's coroutine instead of handing it to the Lua code that resumed it,
        // which sees nothing of it. A loop in a coroutine of its own held the whole
        // state. One that cannot yield here (inside a function Lua calls from C) goes
        // on, as before.
        // SAFETY: `current` is the running thread's `lua_State`, alive while it runs.
        if slice.resuming.last().map(Thread::to_pointer) == Some(current)
            && unsafe { mlua::ffi::lua_isyieldable(current as *mut mlua::ffi::lua_State) } != 0
        {
            slice.nested_yield = Some(current);
            return Ok(VmState::Yield);
        }
        Ok(VmState::Continue)
    }

    /// The sandbox's `coroutine.resume` is about to resume `co`.
    pub(crate) fn begin_resume(&self, co: Thread) {
        if let Some(slice) = self.running.borrow_mut().as_mut() {
            crate::preempt::resuming(co.to_pointer());
            slice.resuming.push(co);
        }
    }

    /// The sandbox's resume of `co` came back: whether `co` yielded at its slice's end
    /// (or passed such a yield on) rather than by `coroutine.yield()`.
    pub(crate) fn end_resume(&self, co: *const c_void) -> bool {
        let mut running = self.running.borrow_mut();
        let Some(slice) = running.as_mut() else {
            return false;
        };
        // Down to `co`, and it: an entry left above it (a resume that never came back
        // here, its caller out of memory) must not let another coroutine yield.
        let ended = match slice.resuming.iter().rposition(|c| c.to_pointer() == co) {
            Some(at) => slice.resuming.split_off(at),
            None => Vec::new(),
        };
        crate::preempt::resuming(
            slice
                .resuming
                .last()
                .map_or(std::ptr::null(), Thread::to_pointer),
        );
        // Released only once the signal handler can no longer reach them.
        drop(ended);
        if slice.nested_yield == Some(co) {
            slice.nested_yield = None;
            return true;
        }
        false
    }

    /// The running coroutine is about to yield because one it resumed yielded at its
    /// slice's end: its own resumer is to pass the yield on too.
    pub(crate) fn pass_slice_yield_on(&self, current: *const c_void) {
        if let Some(slice) = self.running.borrow_mut().as_mut() {
            slice.nested_yield = Some(current);
        }
    }

    /// Whether the running code has a deadline (a handler's `timeout`, a file's top
    /// level); a process and a handler without `timeout` have none.
    pub fn has_deadline(&self) -> bool {
        self.running
            .borrow()
            .as_ref()
            .is_some_and(|slice| slice.deadline.is_some())
    }

    /// The error message of the running code's deadline once it has passed.
    pub fn overdue(&self) -> Option<String> {
        let running = self.running.borrow();
        let deadline = running.as_ref()?.deadline.as_ref()?;
        (Instant::now() >= deadline.at).then(|| deadline.message.to_string())
    }

    /// Runs `f` (Lua code that is not a coroutine) with a deadline.
    pub fn within<R>(&self, deadline: Deadline, f: impl FnOnce() -> R) -> R {
        let previous = self.running.replace(Some(Slice {
            yields: None,
            ends: None,
            deadline: Some(deadline),
            yield_tried: None,
            nested_yield: None,
            resuming: Vec::new(),
        }));
        let result = f();
        self.restore(previous);
        result
    }

    /// Puts back the slice that ran before one that ends now. The coroutines the
    /// ending slice still holds as resumed (an error skipped their resume's end) are
    /// released only once the watchdog's signal handler names the restored slice's
    /// instead ([`crate::preempt::resuming`]): Lua code after this may collect them.
    fn restore(&self, previous: Option<Slice>) {
        let innermost = previous
            .as_ref()
            .and_then(|slice| slice.resuming.last())
            .map_or(std::ptr::null(), Thread::to_pointer);
        let ended = self.running.replace(previous);
        crate::preempt::resuming(innermost);
        drop(ended);
    }
}

/// A coroutine's future, run in slices: each poll starts a new slice (and keeps the
/// deadline), and ends it when the poll returns. Past the deadline it ends with the
/// deadline's error even while the coroutine waits for something (a publish), not
/// only while it computes.
pub(crate) struct Sliced<'a, F> {
    /// Taken in `drop`, to be dropped under a deadline.
    future: Option<Pin<Box<F>>>,
    clock: Rc<Clock>,
    thread: Thread,
    /// What `thread` runs: an abandoned thread is reset to it, which closes its
    /// to-be-closed variables. Borrowed: a clone would take a registry slot per run.
    body: &'a Function,
    deadline: Option<(Deadline, Pin<Box<tokio::time::Sleep>>)>,
    /// The delivery of a handler's run: released before an abandoned run's `__close`
    /// handlers run, which Lua calls with no error, as if the handler had returned.
    /// Left live, a `__close` that acks "on success" acked a message whose handler
    /// timed out or was stopped (docs/consumers.md, "Handler time limits").
    delivery: Option<Rc<DeliveryState>>,
}

impl<'a, F> Sliced<'a, F> {
    /// `future` runs `thread`, a coroutine of `body`, for `delivery` if it is a
    /// handler's run.
    pub fn new(
        future: F,
        clock: Rc<Clock>,
        thread: Thread,
        body: &'a Function,
        deadline: Option<Deadline>,
        delivery: Option<Rc<DeliveryState>>,
    ) -> Self {
        Sliced {
            future: Some(Box::pin(future)),
            clock,
            thread,
            body,
            delivery,
            deadline: deadline.map(|d| {
                let timer = Box::pin(tokio::time::sleep_until(d.at.into()));
                (d, timer)
            }),
        }
    }
}

impl<F, R> Future for Sliced<'_, F>
where
    F: Future<Output = mlua::Result<R>>,
{
    type Output = mlua::Result<R>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        // The clock as well as the timer: a coroutine that yielded at its slice's end
        // is polled again at once, before the timer driver has looked at the time.
        if let Some((deadline, timer)) = this.deadline.as_mut()
            && (timer.as_mut().poll(cx).is_ready() || Instant::now() >= deadline.at)
        {
            return Poll::Ready(Err(mlua::Error::runtime(&*deadline.message)));
        }
        let slice = Slice {
            yields: Some(this.thread.to_pointer()),
            ends: None,
            deadline: this.deadline.as_ref().map(|(d, _)| d.clone()),
            yield_tried: None,
            nested_yield: None,
            resuming: Vec::new(),
        };
        // A coroutine resumed while another's slice is set (a handler polled from
        // inside another's Rust callback) restores that one afterwards.
        let previous = this.clock.running.replace(Some(slice));
        let polling = crate::preempt::Polling::start(this.thread.to_pointer());
        // `future` is only taken by `drop`, so it is always here while polled.
        let result = match this.future.as_mut() {
            Some(future) => future.as_mut().poll(cx),
            None => Poll::Pending,
        };
        drop(polling);
        this.clock.restore(previous);
        result
    }
}

/// How long the `__close` handlers of an abandoned coroutine (ended at its deadline,
/// or stopped) may run when its future is dropped.
const CLOSE_TIME: Duration = Duration::from_millis(100);
const CLOSE_OVERRAN: &str =
    "a __close handler ran longer than it may when its coroutine was stopped";

/// How long the `__close` handlers of all the coroutines a state abandons may run
/// in all, per [`CLOSE_WINDOW`]: past it, those of the next ones are stopped at
/// once. 100 ms each, one after the other, made a stop of 200 handlers whose
/// `__close` loops take 20 s, and their worker was left behind as stuck (review).
const CLOSE_BUDGET: Duration = Duration::from_millis(250);
const CLOSE_WINDOW: Duration = Duration::from_secs(1);

impl<F> Drop for Sliced<'_, F> {
    /// Dropping an unfinished coroutine runs its to-be-closed variables' `__close`
    /// handlers: under a deadline of their own, or one that loops would hold the
    /// state's thread for ever.
    fn drop(&mut self) {
        let Some(future) = self.future.take() else {
            return;
        };
        // mlua closes nothing when it drops the future of a coroutine it will not
        // reuse: the reset below does, as Lua 5.4 resets a thread by closing them.
        drop(future);
        // A coroutine that returned has nothing left to close.
        if self.thread.status() == mlua::thread::ThreadStatus::Finished {
            return;
        }
        let lua = self.thread.weak_lua().try_upgrade();
        let waiting = lua
            .as_ref()
            .is_some_and(|lua| crate::context::waits_in_a_call(lua, &self.thread));
        if let Some(delivery) = &self.delivery {
            delivery.release();
        }
        // Lua closes them with no error when the coroutine was stopped, as if it had
        // returned: a handler's "publish on success" there would publish at every
        // attempt of a message retried for its timeout. One that raised passes them
        // its error. A process has no message to retry: its `__close` may still
        // flush what it holds when a shutdown stops it.
        if self.delivery.is_some()
            && self.thread.status() != mlua::thread::ThreadStatus::Error
            && let Some(lua) = &lua
        {
            crate::context::stop(lua, &self.thread);
        }
        // Without the hook (`crate::preempt`), the deadline could not stop them.
        self.clock.hook(&self.thread);
        let began = Instant::now();
        let deadline = Deadline::after(self.clock.close_time(began), CLOSE_OVERRAN);
        // They run on the thread, seen by the watchdog (as `Sliced::poll` does).
        let polling = crate::preempt::Polling::start(self.thread.to_pointer());
        // Their errors, the deadline's included, have no one left to go to.
        let _ = self
            .clock
            .within(deadline, || self.thread.reset(self.body.clone()));
        drop(polling);
        self.clock.closed(began);
        // The futures of the calls it waited in (`queue.publish` holds the encoded
        // body, and an AMQP 0-9-1 driver's confirm window slot) live in userdata on
        // its stack, and in coroutines it made, which only the collector frees: in a
        // quiet state that could be never, and enough of them stalled every publish.
        // Only a run that ends unfinished with a call in flight pays for a full
        // cycle: most stopped or failed runs have none to free, and failing handlers
        // can be many. None when the state goes with it: each of N waiting runs
        // dropped with their state collected a state holding N of them (review:
        // 10,000 waiting process instances took 12 s to stop).
        if waiting
            && !self.clock.closing.get()
            && let Some(lua) = &lua
        {
            let _ = lua.gc_collect();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The watchdog's signal handler sets the hook on the innermost coroutine the
    /// sandbox's `coroutine.resume` runs, by pointer: the slice holds it alive until
    /// its resume ends, or until the slice does when an error skipped that end.
    #[test]
    fn a_resumed_coroutine_lives_as_long_as_the_slice_names_it() -> mlua::Result<()> {
        let lua = Lua::new();
        let clock = Clock::install(&lua)?;
        let seen = lua.create_table()?;
        seen.set_metatable(Some(lua.create_table_from([("__mode", "k")])?))?;
        let alive = |seen: &mlua::Table| -> mlua::Result<bool> {
            lua.gc_collect()?;
            lua.gc_collect()?;
            Ok(seen.pairs::<mlua::Value, bool>().next().is_some())
        };
        let deadline = Deadline::after(Duration::from_secs(60), "late");
        let held = clock.within(deadline, || -> mlua::Result<bool> {
            let co = lua.create_thread(lua.create_function(|_, ()| Ok(()))?)?;
            seen.raw_set(co.clone(), true)?;
            // Its resume began; no end comes, as when an error skipped it.
            clock.begin_resume(co);
            alive(&seen)
        })?;
        assert!(held, "collected while the slice still named it as resumed");
        assert!(
            !alive(&seen)?,
            "still held after its slice ended: the slice leaks what it resumed"
        );
        Ok(())
    }
}
