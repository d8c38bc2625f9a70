//! Whole-memory states.
#![no_main]
use libfuzzer_sys::fuzz_target;
use llama_memory::state;
use llama_memory_fuzz::check;

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    check(data[0], |m| state::set_data(m, &data[1..]));
});
