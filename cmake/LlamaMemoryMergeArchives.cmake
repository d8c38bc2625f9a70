# Puts the Rust archive into the static drop-in libllama.a, in place, so that a consumer links
# it exactly as stock's (one archive, no extra library) and sees exactly stock's symbols.
#
#   cmake -DAR=<ar> -DRANLIB=<ranlib> -DOBJCOPY=<objcopy> -DLD=<ld> -DREADELF=<readelf>
#         -DOUT=<libllama.a, as just archived> -DADD=<the Rust archive> -P LlamaMemoryMergeArchives.cmake
#
# GNU toolchains (Linux): one relocatable object, `ld -r` of every libllama object and the Rust
# archive's members they need, with every global symbol made local (`objcopy
# --keep-global-symbols`) but libllama's own non-hidden ones: the archive then defines the
# symbols stock's does and no Rust or Rust-runtime one (as the shared drop-in, linked with --exclude-libs), so a consumer
# that links another Rust library too cannot clash with it. The Rust standard library's
# objects carry LLVM bitcode (.llvmbc, for cross-language LTO) that binutils' LTO plugins may
# fail to read: those sections are removed from a copy first (the machine code is untouched).
# macOS: libtool -static of both archives (no localization).
cmake_minimum_required(VERSION 3.21)
foreach(var AR OUT ADD)
    if(NOT ${var})
        message(FATAL_ERROR "LlamaMemoryMergeArchives.cmake needs -D${var}=...")
    endif()
endforeach()

function(run)
    execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
    if(NOT rc EQUAL 0)
        string(REPLACE ";" " " cmd "${ARGN}")
        message(FATAL_ERROR "${cmd} failed (${rc}): ${out}${err}")
    endif()
    set(run_out "${out}" PARENT_SCOPE)
endfunction()

set(work "${OUT}.merge")
file(REMOVE_RECURSE "${work}")
file(MAKE_DIRECTORY "${work}")

if(APPLE)
    run(libtool -static -o "${work}/merged.a" "${OUT}" "${ADD}")
    file(RENAME "${work}/merged.a" "${OUT}")
    file(REMOVE_RECURSE "${work}")
    return()
endif()

foreach(var OBJCOPY LD READELF)
    if(NOT ${var})
        message(FATAL_ERROR "LlamaMemoryMergeArchives.cmake needs -D${var}=... on this platform")
    endif()
endforeach()

# libllama's own global definitions: the symbols the merged archive keeps global, but for
# hidden ones (the adapters' hidden variables, upstream's renamed state functions), which no
# consumer may see; the compilers' hidden DW.ref.* personality references stay, as in stock's
# objects.
run("${READELF}" --wide -s "${OUT}")
string(REGEX MATCHALL "[^\n]+" lines "${run_out}")
set(keep "")
foreach(line IN LISTS lines)
    # Num: Value Size Type Bind Vis Ndx Name
    if(line MATCHES "^ *[0-9]+: +[0-9a-fA-F]+ +[0-9]+ +[A-Z_]+ +(GLOBAL|WEAK|UNIQUE) +([A-Z]+) +([A-Z0-9]+) +([^ ]+)")
        set(vis "${CMAKE_MATCH_2}")
        set(ndx "${CMAKE_MATCH_3}")
        set(name "${CMAKE_MATCH_4}")
        if(ndx STREQUAL "UND" OR (vis STREQUAL "HIDDEN" AND NOT name MATCHES "^DW\\.ref\\."))
            continue()
        endif()
        string(APPEND keep "${name}\n")
    endif()
endforeach()
if(keep STREQUAL "")
    message(FATAL_ERROR "no global symbol defined in ${OUT}")
endif()
file(WRITE "${work}/keep.txt" "${keep}")

run("${OBJCOPY}" -R .llvmbc -R .llvmcmd "${ADD}" "${work}/rust.a")
run("${LD}" -r -o "${work}/libllama.o" --whole-archive "${OUT}" --no-whole-archive "${work}/rust.a")
run("${OBJCOPY}" "--keep-global-symbols=${work}/keep.txt" "${work}/libllama.o")
run("${AR}" qc "${work}/merged.a" "${work}/libllama.o")
if(RANLIB)
    run("${RANLIB}" "${work}/merged.a")
endif()
file(RENAME "${work}/merged.a" "${OUT}")
file(REMOVE_RECURSE "${work}")
