//! A message as another client might send it, through decode, a Lua handler and the
//! failure path: see `outside_message.rs` for what must hold.
#![no_main]

#[path = "../outside_message.rs"]
mod outside_message;

use libfuzzer_sys::fuzz_target;

thread_local! {
    static WORLD: (tokio::runtime::Runtime, outside_message::World) = {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let world = rt.block_on(outside_message::World::new());
        (rt, world)
    };
}

fuzz_target!(|data: &[u8]| {
    let case = outside_message::case(data);
    WORLD.with(|(rt, world)| rt.block_on(world.run(case)));
});
