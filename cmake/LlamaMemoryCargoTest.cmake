# The `cargo_test` ctest test: the crate's own cargo suite, as a plain cargo build (ggml
# compiled by ggml-sys, not the CMake one).
#
#   cmake -DCARGO=<cargo> -DMANIFEST=<Cargo.toml> -DTARGET_DIR=<dir> [-DLLAMA_CPP_DIR=<dir>]
#         -P LlamaMemoryCargoTest.cmake
#
# `cargo build` first: tests/c_tests.rs links the C tests against the cdylib, which
# `cargo test` alone does not produce.
cmake_minimum_required(VERSION 3.21)

unset(ENV{GGML_SYS_LINK_DIR})
unset(ENV{GGML_SYS_LINK_KIND})
set(ENV{CARGO_TARGET_DIR} "${TARGET_DIR}")
# The drop-in libllama has its own ctest tests (label dropin, with LLAMA_MEMORY_DROPIN=ON);
# tests/dropin.rs would configure and build a second project tree from inside this one.
set(ENV{LLAMA_MEMORY_DROPIN_TESTS} 0)
if(LLAMA_CPP_DIR)
    set(ENV{LLAMA_CPP_DIR} "${LLAMA_CPP_DIR}")
endif()

foreach(subcommand build test)
    set(args "")
    if(subcommand STREQUAL "build")
        set(args --lib)
    endif()
    message(STATUS "cargo ${subcommand} -p llama-memory ${args}")
    execute_process(
        COMMAND "${CARGO}" ${subcommand} -p llama-memory ${args} --manifest-path "${MANIFEST}"
        RESULT_VARIABLE rc)
    if(NOT rc EQUAL 0)
        message(FATAL_ERROR "cargo ${subcommand} failed: ${rc}")
    endif()
endforeach()
