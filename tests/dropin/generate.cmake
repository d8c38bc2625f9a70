# One `dropin_generate_<model>` ctest test (label dropin_slow): runs tests/dropin/generate.c
# built against stock libllama and against the drop-in on a real model, greedy, and compares
# the two outputs (prompt tokens, every generated token id with a hash of the logits it was
# chosen from, the memory's position range and state size, the raw bits of the last logits)
# byte for byte. Prints each run's timings and the start of the generated text.
#
#   cmake -DSTOCK=<exe> -DDROPIN=<exe> -DMODEL=<gguf> -DARGS=<a,b,...> -DOUT=<path prefix>
#         -P generate.cmake
cmake_minimum_required(VERSION 3.21)

if(NOT EXISTS "${MODEL}")
    message(FATAL_ERROR "no model ${MODEL} (its fetch fixture writes it)")
endif()
string(REPLACE "," ";" args "${ARGS}")
get_filename_component(dir "${OUT}" DIRECTORY)
file(MAKE_DIRECTORY "${dir}")

foreach(variant stock dropin)
    string(TOUPPER "${variant}" var)
    set(exe "${${var}}")
    set(out "${OUT}.${variant}.txt")
    file(REMOVE "${out}")
    string(TIMESTAMP t0 "%s")
    execute_process(COMMAND "${exe}" "${MODEL}" "${out}" ${args}
        RESULT_VARIABLE rc OUTPUT_VARIABLE stdout ERROR_VARIABLE stderr)
    string(TIMESTAMP t1 "%s")
    math(EXPR dt "${t1} - ${t0}")
    if(NOT rc EQUAL 0)
        message(FATAL_ERROR "${variant}: ${exe} ${MODEL} ${out} ${args} failed (${rc}):\n${stdout}${stderr}")
    endif()
    file(WRITE "${OUT}.${variant}.stdout.txt" "${stdout}")
    file(SIZE "${out}" size)
    file(SHA256 "${out}" sha)
    string(STRIP "${stderr}" stderr)
    message(STATUS "${variant}: ${size} bytes, sha256 ${sha} (${dt} s; ${stderr})")
endforeach()
string(SUBSTRING "${stdout}" 0 300 text)
string(REPLACE "\n" " " text "${text}")
message(STATUS "text: ${text}...")

execute_process(COMMAND "${CMAKE_COMMAND}" -E compare_files "${OUT}.stock.txt" "${OUT}.dropin.txt"
    RESULT_VARIABLE same)
if(NOT same EQUAL 0)
    find_program(DIFF diff)
    set(detail "")
    if(DIFF)
        execute_process(COMMAND "${DIFF}" "${OUT}.stock.txt" "${OUT}.dropin.txt"
            OUTPUT_VARIABLE detail ERROR_QUIET)
        string(SUBSTRING "${detail}" 0 4000 detail)
    endif()
    message(FATAL_ERROR "the outputs differ: ${OUT}.stock.txt ${OUT}.dropin.txt\n${detail}")
endif()
file(STRINGS "${OUT}.stock.txt" tokens REGEX "^token ")
list(LENGTH tokens n_tokens)
message(STATUS "identical: ${n_tokens} greedy tokens, their logits and the last logit vector")
