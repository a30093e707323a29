//! Ending a slice without a hook on every instruction (docs/consumers.md, "Handler
//! time limits").
//!
//! Lua calls a count hook by running every instruction of a hooked coroutine through
//! its debug interface: a handler computing in a loop took 1.5–1.7 times as long with the
//! hook set as without (docs/performance.md). So a handler's coroutine runs without
//! the hook until it has computed for a whole slice:
//!
//! - each poll of a handler's coroutine is counted where a watchdog thread sees it;
//! - the watchdog looks every [`SLICE`]; a thread that has been inside the same poll
//!   since its last look gets a signal ([`SIGNAL`]);
//! - the signal handler sets the hook on the coroutine being polled on that thread,
//!   or on the coroutine it is resuming through the sandbox's `coroutine.resume`,
//!   if any (`lua_sethook` is made to be called from a signal handler: Lua's own
//!   interpreter does so on Ctrl-C), to be called at the very next instruction, and
//!   notes that the slice is over ([`slice_overran`]), so that the hook's first call
//!   ends it. Not 10,000 instructions later: one instruction can take milliseconds
//!   (`utf8.len` of 100 MB), and a handler ran 160 s past its 1 s timeout (review);
//! - the watchdog signals again at each look while the same poll goes on (a file's
//!   top level, a coroutine that cannot yield where it is), so that its deadline is
//!   looked at every slice however slow its instructions.
//!
//! From then on the hook does what it did before; the host takes it off again when
//! the coroutine's run returns. Coroutines that Lua code creates, and the main state
//! (a file's top level), keep the hook all the time: they are rare.
//!
//! Where the signal's handler cannot be installed (another handler owns
//! [`SIGNAL`], or not on Unix), handler coroutines keep the hook as before
//! ([`available`] is false).

#[cfg(all(unix, test))]
pub(crate) use unix::wait_until_watchdog_parks;
#[cfg(unix)]
pub(crate) use unix::{Polling, available, hook, resuming, slice_overran};

#[cfg(not(unix))]
pub(crate) use elsewhere::{Polling, available, hook, resuming, slice_overran};

/// The signal that ends a slice: SIGURG, which no process gets unless it asks for
/// out-of-band socket data, and whose default action is to be ignored (so one that
/// arrived late, after the handler was gone, would do nothing). Go's runtime
/// preempts its goroutines with it for the same reasons.
#[cfg(unix)]
pub(crate) const SIGNAL: libc::c_int = libc::SIGURG;

#[cfg(unix)]
mod unix {
    use std::ptr;
    use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex, OnceLock};

    use mlua::ffi;

    use super::SIGNAL;
    use crate::slices::{CHECK_EVERY, SLICE};

    /// The hook function mlua sets for the state's global hook (one function for
    /// every state), set on a coroutine when its slice is over. Null until a state
    /// installs its hook.
    static HOOK: AtomicPtr<()> = AtomicPtr::new(ptr::null_mut());

    thread_local! {
        /// The coroutine being polled on this thread, for the signal handler.
        static POLLED: AtomicPtr<ffi::lua_State> = const { AtomicPtr::new(ptr::null_mut()) };
        /// The coroutine the sandbox's `coroutine.resume` runs now inside that poll,
        /// innermost (null: none), for the signal handler.
        static RESUMED: AtomicPtr<ffi::lua_State> = const { AtomicPtr::new(ptr::null_mut()) };
        /// The signal came during the poll in progress on this thread.
        static OVERRAN: AtomicBool = const { AtomicBool::new(false) };
        /// What the watchdog sees of this thread.
        static WATCHED: Registration = Registration::new();
    }

    /// Whether handler coroutines may run without the hook: the signal's handler is
    /// installed and `lua`'s hook is known. Call once the state has its global hook.
    pub(crate) fn available(lua: &mlua::Lua) -> bool {
        if !signal_handler_installed() {
            return false;
        }
        // SAFETY: reads the hook of the state running the closure, in a protected call.
        let hook = unsafe {
            let mut hook = None;
            let read = lua.exec_raw::<()>((), |state| hook = ffi::lua_gethook(state));
            read.ok().and(hook)
        };
        match hook {
            Some(hook) => {
                HOOK.store(hook as *mut (), Ordering::Release);
                true
            }
            None => false,
        }
    }

    /// Whether the signal came during the poll in progress on this thread: its slice
    /// is over.
    pub(crate) fn slice_overran() -> bool {
        OVERRAN
            .try_with(|overran| overran.load(Ordering::Relaxed))
            .unwrap_or(false)
    }

    /// The sandbox's `coroutine.resume` runs `coroutine` now (null: it came back to
    /// the coroutine being polled). It must stay alive while it is named here.
    pub(crate) fn resuming(coroutine: *const std::ffi::c_void) {
        let _ = RESUMED.try_with(|resumed| resumed.store(coroutine as *mut _, Ordering::Relaxed));
    }

    /// One poll of a handler's coroutine (or a run of Lua code under a deadline on
    /// another state), seen by the watchdog while it lasts.
    pub(crate) struct Polling {
        previous: *mut ffi::lua_State,
        previous_resumed: *mut ffi::lua_State,
        previous_overran: bool,
    }

    impl Polling {
        /// `coroutine` (a [`mlua::Thread`]'s pointer) is about to be resumed on this
        /// thread; it must stay alive until the returned value is dropped.
        pub(crate) fn start(coroutine: *const std::ffi::c_void) -> Polling {
            let previous = POLLED
                .try_with(|polled| polled.swap(coroutine as *mut _, Ordering::Relaxed))
                .unwrap_or(ptr::null_mut());
            let previous_resumed = RESUMED
                .try_with(|resumed| resumed.swap(ptr::null_mut(), Ordering::Relaxed))
                .unwrap_or(ptr::null_mut());
            let previous_overran = OVERRAN
                .try_with(|overran| overran.swap(false, Ordering::Relaxed))
                .unwrap_or(false);
            let _ = WATCHED.try_with(|watched| {
                if let Some(thread) = &watched.thread {
                    thread.polls.fetch_add(1, Ordering::Relaxed);
                    thread.depth.fetch_add(1, Ordering::SeqCst);
                    watchdog().wake_if_parked();
                }
            });
            Polling {
                previous,
                previous_resumed,
                previous_overran,
            }
        }
    }

    impl Drop for Polling {
        fn drop(&mut self) {
            let _ = WATCHED.try_with(|watched| {
                if let Some(thread) = &watched.thread {
                    thread.depth.fetch_sub(1, Ordering::SeqCst);
                }
            });
            let _ = POLLED.try_with(|polled| polled.store(self.previous, Ordering::Relaxed));
            let _ =
                RESUMED.try_with(|resumed| resumed.store(self.previous_resumed, Ordering::Relaxed));
            let _ =
                OVERRAN.try_with(|overran| overran.store(self.previous_overran, Ordering::Relaxed));
        }
    }

    /// What the watchdog knows of one thread that polls handler coroutines.
    struct Watched {
        /// Polls started on the thread: the same count at two looks is one long poll.
        polls: AtomicU64,
        /// Polls in progress (one coroutine can be polled from another's callback).
        depth: AtomicU32,
        pthread: libc::pthread_t,
        /// False once the thread is ending: it may then no longer be signalled. Held
        /// while signalling, so that the thread cannot end in between.
        alive: Mutex<bool>,
        /// The watchdog's own note: the poll count at its last look.
        seen: AtomicU64,
    }

    /// This thread's entry in the watchdog's list, marked ended with the thread.
    struct Registration {
        thread: Option<Arc<Watched>>,
    }

    impl Registration {
        fn new() -> Registration {
            let thread = Arc::new(Watched {
                polls: AtomicU64::new(0),
                depth: AtomicU32::new(0),
                // SAFETY: pthread_self has no preconditions.
                pthread: unsafe { libc::pthread_self() },
                alive: Mutex::new(true),
                seen: AtomicU64::new(u64::MAX),
            });
            let registered = watchdog()
                .threads
                .lock()
                .map(|mut threads| threads.push(Arc::clone(&thread)))
                .is_ok();
            Registration {
                thread: registered.then_some(thread),
            }
        }
    }

    impl Drop for Registration {
        fn drop(&mut self) {
            if let Some(thread) = &self.thread {
                // A poisoned lock: the watchdog panicked and signals no one.
                if let Ok(mut alive) = thread.alive.lock() {
                    *alive = false;
                }
            }
        }
    }

    struct Watchdog {
        threads: Mutex<Vec<Arc<Watched>>>,
        /// The watchdog waits for a poll to start: it has seen none for a while.
        parked: AtomicBool,
        handle: Option<std::thread::Thread>,
    }

    impl Watchdog {
        fn wake_if_parked(&self) {
            if self.parked.load(Ordering::SeqCst)
                && self.parked.swap(false, Ordering::SeqCst)
                && let Some(handle) = &self.handle
            {
                handle.unpark();
            }
        }
    }

    /// Rung each time the watchdog parks, for [`wait_until_watchdog_parks`].
    #[cfg(test)]
    static PARKING: std::sync::Condvar = std::sync::Condvar::new();
    #[cfg(test)]
    static PARKING_LOCK: Mutex<()> = Mutex::new(());

    /// Blocks until the watchdog parks, waiting for a poll to start (it may be parked
    /// already); `false` if it has not within `limit` (other tests kept polling).
    #[cfg(test)]
    pub(crate) fn wait_until_watchdog_parks(limit: std::time::Duration) -> bool {
        let Ok(guard) = PARKING_LOCK.lock() else {
            return false;
        };
        PARKING
            .wait_timeout_while(guard, limit, |_| !watchdog().parked.load(Ordering::SeqCst))
            .is_ok_and(|(_, waited)| !waited.timed_out())
    }

    /// After this many looks with no poll in progress anywhere, the watchdog parks
    /// until one starts (an idle process is not woken every slice).
    const IDLE_LOOKS: u32 = 200;

    fn watchdog() -> &'static Watchdog {
        static WATCHDOG: OnceLock<Watchdog> = OnceLock::new();
        WATCHDOG.get_or_init(|| {
            let handle = std::thread::Builder::new()
                .name("queue-lua-slices".into())
                .spawn(watch)
                .ok()
                .map(|joined| joined.thread().clone());
            Watchdog {
                threads: Mutex::new(Vec::new()),
                parked: AtomicBool::new(false),
                handle,
            }
        })
    }

    fn watch() {
        let mut idle_looks = 0;
        loop {
            std::thread::park_timeout(SLICE);
            let watchdog = watchdog();
            let Ok(mut threads) = watchdog.threads.lock() else {
                return;
            };
            threads.retain(|thread| thread.alive.lock().map(|alive| *alive).unwrap_or(false));
            let mut busy = false;
            for thread in threads.iter() {
                busy |= look_at(thread);
            }
            if busy {
                idle_looks = 0;
                continue;
            }
            idle_looks += 1;
            if idle_looks < IDLE_LOOKS {
                continue;
            }
            // Park, unless a poll started since the look: a poll that starts after
            // `parked` is set sees it and unparks.
            watchdog.parked.store(true, Ordering::SeqCst);
            let started = threads
                .iter()
                .any(|thread| thread.depth.load(Ordering::SeqCst) > 0);
            drop(threads);
            if !started {
                #[cfg(test)]
                {
                    // Under the lock: a waiter between its look at `parked` and its
                    // wait cannot miss the ring.
                    let _ring = PARKING_LOCK.lock();
                    PARKING.notify_all();
                }
                std::thread::park();
            }
            watchdog.parked.store(false, Ordering::SeqCst);
            idle_looks = 0;
        }
    }

    /// Signals `thread` if it is still inside the poll it was in at the last look
    /// (again at each look while that poll goes on: its deadline is looked at once a
    /// slice); whether it is polling at all.
    fn look_at(thread: &Watched) -> bool {
        let polls = thread.polls.load(Ordering::Relaxed);
        let polling = thread.depth.load(Ordering::SeqCst) > 0;
        let seen = thread.seen.swap(polls, Ordering::Relaxed);
        if polling
            && seen == polls
            && let Ok(alive) = thread.alive.lock()
            && *alive
        {
            // SAFETY: the thread has not ended: it marks itself ended under this lock
            // before it does.
            unsafe { libc::pthread_kill(thread.pthread, SIGNAL) };
        }
        polling
    }

    /// Runs on the thread that was polling when the watchdog signalled it.
    extern "C" fn on_signal(_: libc::c_int) {
        let hook = HOOK.load(Ordering::Acquire);
        let coroutine = POLLED
            .try_with(|polled| polled.load(Ordering::Relaxed))
            .unwrap_or(ptr::null_mut());
        if hook.is_null() || coroutine.is_null() {
            return;
        }
        let _ = OVERRAN.try_with(|overran| overran.store(true, Ordering::Relaxed));
        let resumed = RESUMED
            .try_with(|resumed| resumed.load(Ordering::Relaxed))
            .unwrap_or(ptr::null_mut());
        // Only the one running Lua: a coroutine the polled one resumes passes its
        // slice's yield on through the sandbox's `coroutine.resume`, and the polled
        // one's hook would make it yield inside that function, before it has seen
        // that yield (which its resumer would then take for a `coroutine.yield()`).
        let running = if resumed.is_null() {
            coroutine
        } else {
            resumed
        };
        // SAFETY: the coroutine is alive while it is polled (`Polling::start`), the
        // one it resumes while it is resumed (`resuming`); and `lua_sethook` may be
        // called from a signal handler that interrupts the coroutine's own thread.
        unsafe { hook_at_the_next_instruction(running) };
    }

    /// # Safety
    /// `coroutine` is alive.
    unsafe fn hook_at_the_next_instruction(coroutine: *mut ffi::lua_State) {
        // SAFETY: as the caller promised.
        unsafe { ffi::lua_sethook(coroutine, Some(look_now), ffi::LUA_MASKCOUNT, 1) };
    }

    /// The hook for one instruction: sets the state's own hook back at its usual
    /// count and calls it now. It does nothing after that call, which may yield (Lua
    /// then returns from it) or raise.
    unsafe extern "C-unwind" fn look_now(state: *mut ffi::lua_State, ar: *mut ffi::lua_Debug) {
        let hook = HOOK.load(Ordering::Acquire);
        if hook.is_null() {
            return;
        }
        // SAFETY: `state` runs this hook, so it is alive; `hook` is the function
        // `lua_gethook` returned, called as Lua would call it.
        unsafe {
            set_hook(state, hook);
            let hook = std::mem::transmute::<*mut (), ffi::lua_Hook>(hook);
            hook(state, ar)
        }
    }

    /// Sets the state's hook on `coroutine`, which is not running: for a coroutine
    /// that is to run Lua code under a deadline outside its slices.
    pub(crate) fn hook(coroutine: &mlua::Thread) {
        let hook = HOOK.load(Ordering::Acquire);
        if !hook.is_null() {
            // SAFETY: a `Thread`'s pointer is its `lua_State`, alive while borrowed.
            unsafe { set_hook(coroutine.to_pointer() as *mut _, hook) };
        }
    }

    /// # Safety
    /// `coroutine` is alive, and `hook` is what [`available`] stored.
    unsafe fn set_hook(coroutine: *mut ffi::lua_State, hook: *mut ()) {
        // SAFETY: `hook` is the function `lua_gethook` returned.
        unsafe {
            let hook = std::mem::transmute::<*mut (), ffi::lua_Hook>(hook);
            ffi::lua_sethook(coroutine, Some(hook), ffi::LUA_MASKCOUNT, CHECK_EVERY as _);
        }
    }

    /// Installs [`on_signal`] once, unless the process already handles the signal.
    fn signal_handler_installed() -> bool {
        static INSTALLED: OnceLock<bool> = OnceLock::new();
        *INSTALLED.get_or_init(|| {
            // SAFETY: sigaction with valid pointers; the handler only touches atomics
            // and calls `lua_sethook`.
            unsafe {
                let mut current: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(SIGNAL, ptr::null(), &mut current) != 0 {
                    return false;
                }
                if current.sa_sigaction != libc::SIG_DFL && current.sa_sigaction != libc::SIG_IGN {
                    return false;
                }
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
                action.sa_flags = libc::SA_RESTART | libc::SA_ONSTACK;
                libc::sigemptyset(&mut action.sa_mask);
                libc::sigaction(SIGNAL, &action, ptr::null_mut()) == 0
            }
        })
    }
}

#[cfg(not(unix))]
mod elsewhere {
    /// Never: handler coroutines keep the hook.
    pub(crate) fn available(_: &mlua::Lua) -> bool {
        false
    }

    pub(crate) fn slice_overran() -> bool {
        false
    }

    /// Never called: no coroutine goes without the hook.
    pub(crate) fn hook(_: &mlua::Thread) {}

    /// Nothing to note: no signal ends a slice.
    pub(crate) fn resuming(_: *const std::ffi::c_void) {}

    pub(crate) struct Polling;

    impl Polling {
        pub(crate) fn start(_: *const std::ffi::c_void) -> Polling {
            Polling
        }
    }
}
