# One `dropin_equivalence_<config>` or `dropin_generate_<config>` ctest test: runs
# tests/dropin/equivalence.c (or generate.c, the real-model tier) built against stock libllama
# and against the drop-in on one model with one set of arguments, and compares the two outputs
# byte for byte. A program's stdout (generate.c: the text) is kept next to its output and its
# stderr (timings) printed; neither is compared.
#
#   cmake -DSTOCK=<exe> -DDROPIN=<exe> -DMODEL=<gguf> -DARGS=<a,b,...> -DOUT=<path prefix>
#         -P compare.cmake
cmake_minimum_required(VERSION 3.21)

if(NOT EXISTS "${MODEL}")
    message(FATAL_ERROR "no model ${MODEL} (its fixture test writes it)")
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
    file(SIZE "${out}" size)
    file(SHA256 "${out}" sha)
    string(STRIP "${stderr}" stderr)
    message(STATUS "${variant}: ${size} bytes, sha256 ${sha} (${dt} s) ${stderr}")
    if(NOT stdout STREQUAL "")
        file(WRITE "${OUT}.${variant}.stdout.txt" "${stdout}")
        string(SUBSTRING "${stdout}" 0 300 text)
        string(REPLACE "\n" " " text "${text}")
        message(STATUS "${variant} text: ${text}...")
    endif()
endforeach()

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
if(tokens)
    list(LENGTH tokens n_tokens)
    message(STATUS "identical: ${n_tokens} greedy tokens, their logits and the last logit vector")
    return()
endif()
file(STRINGS "${OUT}.stock.txt" lines REGEX "^(logits|blob|decode) ")
set(n_logits 0)
set(n_blobs 0)
set(n_decodes 0)
foreach(line IN LISTS lines)
    if(line MATCHES "^logits ")
        math(EXPR n_logits "${n_logits} + 1")
    elseif(line MATCHES "^blob ")
        math(EXPR n_blobs "${n_blobs} + 1")
    else()
        math(EXPR n_decodes "${n_decodes} + 1")
    endif()
endforeach()
message(STATUS "identical: ${n_decodes} decodes, ${n_logits} logit vectors, ${n_blobs} state blobs and files")
