# One `dropin_hostile_<model>` ctest test: tests/dropin/hostile.c (the hostile tier) built
# against stock libllama and against the drop-in, run on one model over the same cases. Stock's
# counts are printed beside the drop-in's; the test fails when the drop-in has any abort,
# exception, signal, hang, corruption (or a case its harness could not set up).
#
#   cmake -DSTOCK=<exe> -DDROPIN=<exe> -DMODEL=<gguf> -DWORK=<dir> -DSAMPLE=<n> -DARGS=<a,b,...>
#         -P hostile.cmake
# SAMPLE: the cases spread evenly over the corpus (0: all of it); STOCK empty: the drop-in only.
cmake_minimum_required(VERSION 3.21)

if(NOT EXISTS "${MODEL}")
    message(FATAL_ERROR "no model ${MODEL} (its fixture test writes it)")
endif()
string(REPLACE "," ";" args "${ARGS}")
get_filename_component(name "${MODEL}" NAME_WE)
set(summary "")
foreach(variant stock dropin)
    string(TOUPPER "${variant}" var)
    set(exe "${${var}}")
    if(exe STREQUAL "")
        continue()
    endif()
    if(variant STREQUAL "dropin")
        set(require 1)
    else()
        set(require 0)
    endif()
    file(MAKE_DIRECTORY "${WORK}/${variant}")
    string(TIMESTAMP t0 "%s")
    execute_process(COMMAND "${exe}" "${MODEL}" "${WORK}/${variant}" --sample "${SAMPLE}"
                            --require-clean ${require} --label "${name} ${variant}" ${args}
        RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
    string(TIMESTAMP t1 "%s")
    math(EXPR dt "${t1} - ${t0}")
    message(STATUS "${variant} (${dt} s):\n${out}${err}")
    string(APPEND summary "${out}")
    if(NOT rc EQUAL 0)
        message(FATAL_ERROR "${variant}: ${exe} failed (${rc}): the hostile tier found the cases above")
    endif()
endforeach()
