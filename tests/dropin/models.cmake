# The `dropin_models` ctest fixture: writes the equivalence tests' tiny GGUF models into
# MODELS_DIR unless they are all there, with the test-only reference crate's writers
# (`cargo test --test dropin write_models`, see tests/dropin.rs). Never committed.
#
#   cmake -DCARGO=<cargo> -DMANIFEST=<Cargo.toml> -DTARGET_DIR=<dir> -DMODELS_DIR=<dir>
#         -DMODELS=<name;...> -P models.cmake
cmake_minimum_required(VERSION 3.21)

string(REPLACE "," ";" MODELS "${MODELS}")
set(missing "")
foreach(model IN LISTS MODELS)
    if(NOT EXISTS "${MODELS_DIR}/${model}.gguf")
        list(APPEND missing "${model}")
    endif()
endforeach()
if(NOT missing)
    message(STATUS "models present in ${MODELS_DIR}: ${MODELS}")
    return()
endif()

message(STATUS "writing ${missing} into ${MODELS_DIR} (cargo test --test dropin write_models; "
               "the first run builds the reference crate in ${TARGET_DIR})")
file(MAKE_DIRECTORY "${MODELS_DIR}")
set(ENV{CARGO_TARGET_DIR} "${TARGET_DIR}")
set(ENV{LLAMA_MEMORY_DROPIN_WRITE_MODELS} "${MODELS_DIR}")
unset(ENV{LLAMA_MEMORY_DROPIN_TESTS})
unset(ENV{GGML_SYS_LINK_DIR})
unset(ENV{GGML_SYS_LINK_KIND})
execute_process(
    COMMAND "${CARGO}" test -p llama-memory --manifest-path "${MANIFEST}" --test dropin
            -- --exact write_models --nocapture
    RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
    message(FATAL_ERROR "cargo test --test dropin write_models failed: ${rc}")
endif()
foreach(model IN LISTS MODELS)
    if(NOT EXISTS "${MODELS_DIR}/${model}.gguf")
        message(FATAL_ERROR "${MODELS_DIR}/${model}.gguf was not written")
    endif()
endforeach()
