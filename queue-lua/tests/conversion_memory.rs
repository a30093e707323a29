//! What converting a Lua value takes of the process's memory, outside Lua's limit: a
//! value over its bound is refused (or, for an error value's text, cut) before its
//! conversion holds more than the bound.
//! A test binary of its own, with one test, so that the allocator's peak it reads is
//! this conversion's alone.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use queue_core::ErrorKind;
use queue_lua::value::{from_lua_within, headers_from_lua};

/// The system allocator, counting the bytes allocated now and the most at once.
struct Counting;

static NOW: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call goes to `System` unchanged; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            let now = NOW.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        NOW.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The most `f` held at once beyond what was held when it started.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = NOW.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = f();
    (out, PEAK.load(Ordering::Relaxed).saturating_sub(base))
}

/// A table of a million entries (about 16 MiB of Lua) published with a 64 KiB bound:
/// every entry was collected (about 32 MiB of Rust) before the bound was looked at.
/// So with headers: all were converted before their 48 KiB bound was.
#[test]
fn oversized_values_are_refused_or_cut_before_they_are_copied() {
    let lua = mlua::Lua::new();
    let values: mlua::Value = lua
        .load("local t = {} for i = 1, 1000000 do t[i] = i end return t")
        .eval()
        .unwrap();
    let headers: mlua::Value = lua
        .load("local t = {} for i = 1, 200000 do t['h' .. i] = string.rep('v', 100) end return t")
        .eval()
        .unwrap();
    let bound = 64 * 1024;

    let (converted, peak) = peak_of(|| from_lua_within(&values, "data", bound));
    assert_eq!(converted.unwrap_err().kind(), ErrorKind::Invalid);
    // The entries collected up to the bound (a Lua value each, 64 Ki of them at most)
    // are a few MiB; the whole table's were 80.
    assert!(peak < 8 * 1024 * 1024, "a 64 KiB bound held {peak} bytes");

    let (converted, peak) = peak_of(|| headers_from_lua(&headers));
    let err = converted.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid);
    assert!(err.message().contains("headers take more than"), "{err}");
    assert!(peak < 1024 * 1024, "headers held {peak} bytes");

    // An error value keeps 4 KiB of its message and 1 KiB of each of 16 details: a
    // string of 16 MiB as the message and every detail, one string to Lua, was copied
    // whole 17 times (272 MiB outside Lua's limit) before it was cut.
    let host = queue_lua::LuaHost::new(Default::default(), Default::default()).unwrap();
    let errors: mlua::Table = host.globals().get("errors").unwrap();
    let new: mlua::Function = errors.get("new").unwrap();
    let big = host
        .lua()
        .create_string(vec![b'x'; 16 * 1024 * 1024])
        .unwrap();
    // Half the details are the string, half a table whose `__tostring` returns it.
    let showing_big = host.lua().create_table().unwrap();
    let meta = host.lua().create_table().unwrap();
    let give_big = {
        let big = big.clone();
        host.lua()
            .create_function(move |_, ()| Ok(big.clone()))
            .unwrap()
    };
    meta.set("__tostring", give_big).unwrap();
    showing_big.set_metatable(Some(meta)).unwrap();
    let details = host.lua().create_table().unwrap();
    for (n, key) in ('a'..='p').enumerate() {
        match n % 2 {
            0 => details.set(key.to_string(), &big).unwrap(),
            _ => details.set(key.to_string(), &showing_big).unwrap(),
        }
    }
    let spec = host.lua().create_table().unwrap();
    spec.set("message", &big).unwrap();
    spec.set("details", details).unwrap();
    let (made, peak) = peak_of(|| new.call::<mlua::Value>(spec));
    let made = made.unwrap();
    let error = made
        .as_userdata()
        .unwrap()
        .borrow::<queue_lua::LuaError>()
        .unwrap();
    assert!(
        error.message.contains("truncated from 16777216 bytes"),
        "{}",
        &error.message[4000..]
    );
    assert_eq!(error.details.len(), 16);
    assert!(peak < 1024 * 1024, "errors.new held {peak} bytes");
}
