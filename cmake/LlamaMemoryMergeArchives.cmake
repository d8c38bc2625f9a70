# Appends the members of one static archive to another, in place (the static drop-in libllama:
# the Rust archive merged into libllama.a, so that a consumer links it exactly as stock's).
#
#   cmake -DAR=<ar> -DRANLIB=<ranlib> -DOUT=<archive to extend> -DADD=<archive> -P LlamaMemoryMergeArchives.cmake
#
# GNU ar: an MRI script (ADDLIB keeps members of the same name apart, which the Rust archive
# has); macOS: libtool -static.
cmake_minimum_required(VERSION 3.21)
foreach(var AR OUT ADD)
    if(NOT ${var})
        message(FATAL_ERROR "LlamaMemoryMergeArchives.cmake needs -D${var}=...")
    endif()
endforeach()
set(tmp "${OUT}.merging")
file(REMOVE "${tmp}")
if(APPLE)
    execute_process(COMMAND libtool -static -o "${tmp}" "${OUT}" "${ADD}" RESULT_VARIABLE rc ERROR_VARIABLE err)
else()
    set(script "${OUT}.mri")
    file(WRITE "${script}" "CREATE ${tmp}\nADDLIB ${OUT}\nADDLIB ${ADD}\nSAVE\nEND\n")
    execute_process(COMMAND "${AR}" -M INPUT_FILE "${script}" RESULT_VARIABLE rc ERROR_VARIABLE err)
    file(REMOVE "${script}")
endif()
if(NOT rc EQUAL 0 OR NOT EXISTS "${tmp}")
    message(FATAL_ERROR "merging ${ADD} into ${OUT} failed (${rc}): ${err}")
endif()
if(RANLIB AND NOT APPLE)
    execute_process(COMMAND "${RANLIB}" "${tmp}" RESULT_VARIABLE rc)
    if(NOT rc EQUAL 0)
        message(FATAL_ERROR "${RANLIB} ${tmp} failed (${rc})")
    endif()
endif()
file(RENAME "${tmp}" "${OUT}")
