# The `dropin_swapin_*` ctest tests: the strongest form of "drop-in". An executable built once
# against stock libllama (its RUNPATH points at stock's build directory) runs twice: as built,
# and with LD_LIBRARY_PATH=<the drop-in's directory> and nothing else changed. Each run's
# loaded libllama is checked from the dynamic loader itself (LD_DEBUG=libs: the file it called
# the initializers of), and the two outputs must be equal byte for byte.
#
#   cmake -DEXE=<program built against stock> -DSTOCK_DIR=<stock libllama's directory>
#         -DDROPIN_DIR=<the drop-in libllama's directory> -DARGS=<a,b,...> -DWORK=<dir>
#         [-DOUTPUT=file|stdout] -P swapin.cmake
#
# ARGS may hold @OUT@, replaced by the run's output file (OUTPUT=file, the default: that file
# is compared); with OUTPUT=stdout the program's standard output is compared.
cmake_minimum_required(VERSION 3.21)
foreach(var EXE STOCK_DIR DROPIN_DIR WORK)
    if(NOT ${var})
        message(FATAL_ERROR "swapin.cmake needs -D${var}=...")
    endif()
endforeach()
if(NOT OUTPUT)
    set(OUTPUT file)
endif()
file(REMOVE_RECURSE "${WORK}")
file(MAKE_DIRECTORY "${WORK}")
file(REAL_PATH "${STOCK_DIR}" stock_dir)
file(REAL_PATH "${DROPIN_DIR}" dropin_dir)

foreach(variant stock dropin)
    set(out "${WORK}/out.${variant}.txt")
    string(REPLACE "@OUT@" "${out}" args "${ARGS}")
    string(REPLACE "," ";" args "${args}")
    if(variant STREQUAL "stock")
        set(env --unset=LD_LIBRARY_PATH)
    else()
        set(env "LD_LIBRARY_PATH=${dropin_dir}")
    endif()
    execute_process(
        COMMAND "${CMAKE_COMMAND}" -E env ${env} LD_DEBUG=libs "LD_DEBUG_OUTPUT=${WORK}/ld.${variant}"
                "${EXE}" ${args}
        RESULT_VARIABLE rc OUTPUT_VARIABLE stdout ERROR_VARIABLE stderr)
    if(NOT rc EQUAL 0)
        message(FATAL_ERROR "${variant}: ${EXE} ${args} failed (${rc}):\n${stdout}${stderr}")
    endif()
    if(OUTPUT STREQUAL "stdout")
        file(WRITE "${out}" "${stdout}")
    endif()
    # the loader's own account: which libllama it ran the initializers of
    file(GLOB ld_logs "${WORK}/ld.${variant}.*")
    set(loaded "")
    foreach(log IN LISTS ld_logs)
        file(STRINGS "${log}" lines REGEX "calling init: .*/libllama\\.so")
        foreach(line IN LISTS lines)
            string(REGEX REPLACE ".*calling init: " "" path "${line}")
            list(APPEND loaded "${path}")
        endforeach()
    endforeach()
    list(REMOVE_DUPLICATES loaded)
    list(LENGTH loaded n_loaded)
    if(NOT n_loaded EQUAL 1)
        message(FATAL_ERROR "${variant}: expected one libllama loaded, the loader reports: ${loaded}")
    endif()
    get_filename_component(loaded_dir "${loaded}" DIRECTORY)
    file(REAL_PATH "${loaded_dir}" loaded_dir)
    if(NOT loaded_dir STREQUAL "${${variant}_dir}")
        message(FATAL_ERROR "${variant}: the program loaded ${loaded}, not the library in ${${variant}_dir}")
    endif()
    file(SIZE "${out}" size)
    file(SHA256 "${out}" sha)
    message(STATUS "${variant}: loaded ${loaded}; ${size} bytes of output, sha256 ${sha}")
endforeach()
execute_process(COMMAND "${CMAKE_COMMAND}" -E compare_files "${WORK}/out.stock.txt" "${WORK}/out.dropin.txt"
    RESULT_VARIABLE same)
if(NOT same EQUAL 0)
    message(FATAL_ERROR "the outputs differ: ${WORK}/out.stock.txt ${WORK}/out.dropin.txt")
endif()
message(STATUS "identical: ${EXE}, built against stock, gives stock's output byte for byte on the drop-in "
               "swapped in by LD_LIBRARY_PATH alone")
