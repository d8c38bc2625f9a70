# Helpers of llama-memory's CMakeLists.txt (configure-time only).

# llama_memory_cargo_version(<out-var> <Cargo.toml>)
#
# The `version` of the manifest's [package] table (not [workspace.package] or a dependency's).
function(llama_memory_cargo_version out_var manifest)
    file(STRINGS "${manifest}" lines)
    set(section "")
    foreach(line IN LISTS lines)
        if(line MATCHES "^[ \t]*\\[([^]]*)\\]")
            set(section "${CMAKE_MATCH_1}")
        elseif(section STREQUAL "package" AND line MATCHES "^[ \t]*version[ \t]*=[ \t]*\"([^\"]*)\"")
            set(${out_var} "${CMAKE_MATCH_1}" PARENT_SCOPE)
            return()
        endif()
    endforeach()
    message(FATAL_ERROR "llama_memory: no [package] version in ${manifest}")
endfunction()

# llama_memory_locate_llama_cpp(<out-var> CARGO <cargo> PACKAGE <name> VERSION <x.y.z> WORK_DIR <dir>)
#
# Finds the `llama.cpp` directory shipped in the crates.io package <name> at exactly <x.y.z>,
# the way ggml-sys's build script does: a throw-away manifest (written into WORK_DIR) depends
# on it under a never-true cfg, and `cargo metadata` resolves it. Cargo downloads the package
# into its registry cache when needed and honours the user's cargo configuration (mirrors,
# proxies, offline mode). --offline is tried first so no network is used once it is cached.
function(llama_memory_locate_llama_cpp out_var)
    cmake_parse_arguments(PARSE_ARGV 1 arg "" "CARGO;PACKAGE;VERSION;WORK_DIR" "")
    set(manifest "${arg_WORK_DIR}/Cargo.toml")
    # The empty [workspace] keeps cargo from attaching this manifest to an enclosing workspace.
    set(text "[package]\nname = \"pin\"\nversion = \"0.0.0\"\nedition = \"2021\"\npublish = false\n\n[workspace]\n\n[target.'cfg(any())'.dependencies]\n${arg_PACKAGE} = \"=${arg_VERSION}\"\n")
    file(MAKE_DIRECTORY "${arg_WORK_DIR}/src")
    file(CONFIGURE OUTPUT "${manifest}" CONTENT "${text}" @ONLY)
    file(CONFIGURE OUTPUT "${arg_WORK_DIR}/src/lib.rs" CONTENT "" @ONLY)

    set(errors "")
    foreach(mode IN ITEMS --offline online)
        set(extra "")
        if(mode STREQUAL "--offline")
            set(extra --offline)
        endif()
        execute_process(
            COMMAND "${arg_CARGO}" metadata --format-version 1 --manifest-path "${manifest}" ${extra}
            WORKING_DIRECTORY "${arg_WORK_DIR}"
            RESULT_VARIABLE rc
            OUTPUT_VARIABLE json
            ERROR_VARIABLE err)
        if(rc EQUAL 0)
            break()
        endif()
        string(APPEND errors "${err}")
    endforeach()
    if(NOT rc EQUAL 0)
        message(FATAL_ERROR
            "llama_memory: `cargo metadata` could not resolve ${arg_PACKAGE} ${arg_VERSION} "
            "(manifest ${manifest}). Pass -DLLAMA_CPP_DIR=<llama.cpp checkout of that version> "
            "instead. cargo said:\n${errors}")
    endif()

    string(JSON count ERROR_VARIABLE json_error LENGTH "${json}" packages)
    if(json_error)
        message(FATAL_ERROR "llama_memory: unexpected `cargo metadata` output: ${json_error}")
    endif()
    set(found "")
    if(count GREATER 0)
        math(EXPR last "${count} - 1")
        foreach(i RANGE ${last})
            string(JSON name GET "${json}" packages ${i} name)
            if(NOT name STREQUAL arg_PACKAGE)
                continue()
            endif()
            string(JSON version GET "${json}" packages ${i} version)
            if(version STREQUAL arg_VERSION)
                string(JSON found GET "${json}" packages ${i} manifest_path)
                break()
            endif()
        endforeach()
    endif()
    if(NOT found)
        message(FATAL_ERROR "llama_memory: `cargo metadata` does not list ${arg_PACKAGE} ${arg_VERSION}")
    endif()
    get_filename_component(dir "${found}" DIRECTORY)
    set(${out_var} "${dir}/llama.cpp" PARENT_SCOPE)
endfunction()

# llama_memory_rust_native_static_libs(<out-var> RUSTC <rustc> WORK_DIR <dir>)
#
# The system libraries a Rust staticlib needs on this target (`rustc --print
# native-static-libs` on an empty crate: the standard library's own needs), as a CMake list
# of library names and linker flags. `-lc` is dropped: every C toolchain links it anyway.
function(llama_memory_rust_native_static_libs out_var)
    cmake_parse_arguments(PARSE_ARGV 1 arg "" "RUSTC;WORK_DIR;TARGET" "")
    file(MAKE_DIRECTORY "${arg_WORK_DIR}")
    file(CONFIGURE OUTPUT "${arg_WORK_DIR}/empty.rs" CONTENT "" @ONLY)
    set(target_args "")
    if(arg_TARGET)
        set(target_args --target "${arg_TARGET}")
    endif()
    execute_process(
        COMMAND "${arg_RUSTC}" --crate-type staticlib --crate-name empty ${target_args}
                --print native-static-libs -o "${arg_WORK_DIR}/libempty.a" "${arg_WORK_DIR}/empty.rs"
        RESULT_VARIABLE rc
        OUTPUT_VARIABLE out
        ERROR_VARIABLE err)
    set(libs "")
    if(rc EQUAL 0 AND "${out}${err}" MATCHES "native-static-libs: ([^\n]*)")
        separate_arguments(flags UNIX_COMMAND "${CMAKE_MATCH_1}")
        set(framework FALSE)
        foreach(flag IN LISTS flags)
            if(framework)
                # "-framework Foo" is one item for target_link_libraries.
                list(APPEND libs "-framework ${flag}")
                set(framework FALSE)
            elseif(flag STREQUAL "-framework")
                set(framework TRUE)
            elseif(flag MATCHES "^-l(.+)$")
                if(NOT CMAKE_MATCH_1 STREQUAL "c")
                    list(APPEND libs "${CMAKE_MATCH_1}")
                endif()
            elseif(flag)
                list(APPEND libs "${flag}")
            endif()
        endforeach()
    else()
        message(WARNING "llama_memory: `rustc --print native-static-libs` failed; "
                        "using the usual Linux list.\n${err}")
        set(libs gcc_s util rt pthread m dl)
    endif()
    file(REMOVE "${arg_WORK_DIR}/libempty.a")
    set(${out_var} "${libs}" PARENT_SCOPE)
endfunction()

# llama_memory_rust_triple(<out-var> <CMAKE_SYSTEM_PROCESSOR> <CMAKE_SYSTEM_NAME>)
#
# The Rust target triple of a cross-compiling toolchain file's system, for the common Linux
# cases; anything else needs -DLLAMA_MEMORY_CARGO_TARGET=<triple>.
function(llama_memory_rust_triple out_var processor system)
    string(TOLOWER "${processor}" p)
    if(p MATCHES "^(x86_64|amd64)$")
        set(arch x86_64)
    elseif(p MATCHES "^(aarch64|arm64)$")
        set(arch aarch64)
    elseif(p MATCHES "^(riscv64|powerpc64le|ppc64le|s390x|loongarch64)$")
        set(arch "${p}")
        if(p STREQUAL "ppc64le")
            set(arch powerpc64le)
        endif()
    elseif(p MATCHES "^(i[3-6]86|x86)$")
        set(arch i686)
    else()
        set(arch "")
    endif()
    if(NOT arch OR NOT system STREQUAL "Linux")
        message(FATAL_ERROR "llama_memory: cross-compiling for ${processor} ${system}: no Rust target "
                            "triple known for it; pass -DLLAMA_MEMORY_CARGO_TARGET=<triple> "
                            "(`rustc --print target-list`)")
    endif()
    set(${out_var} "${arch}-unknown-linux-gnu" PARENT_SCOPE)
endfunction()

# llama_memory_check_llama_cpp(<llama.cpp dir> <pin file> <expected label> <allow other>)
#
# Compares the tree's files with the SHA-256 list of the pinned tree (cmake/llama-cpp-pin.txt,
# scripts/llama-cpp-fingerprint.sh): another llama.cpp version fails here, naming the expected
# and the found versions and the files that differ, instead of deep inside the compile. With
# <allow other> true it only warns.
function(llama_memory_check_llama_cpp dir pin expected allow)
    file(STRINGS "${pin}" lines REGEX "^[0-9a-f]+  ")
    set(differ "")
    foreach(line IN LISTS lines)
        string(REGEX MATCH "^([0-9a-f]+)  (.*)$" _ "${line}")
        set(hash "${CMAKE_MATCH_1}")
        set(path "${CMAKE_MATCH_2}")
        if(NOT EXISTS "${dir}/${path}")
            list(APPEND differ "${path} (missing)")
            continue()
        endif()
        file(SHA256 "${dir}/${path}" found)
        if(NOT found STREQUAL hash)
            list(APPEND differ "${path}")
        endif()
    endforeach()
    if(NOT differ)
        return()
    endif()
    set(found_version "llama ?")
    file(STRINGS "${dir}/CMakeLists.txt" v REGEX "^set\\(LLAMA_VERSION_(MAJOR|MINOR|PATCH) ")
    if(v)
        string(REGEX REPLACE "set\\(LLAMA_VERSION_[A-Z]+ ([0-9]+)\\)" "\\1" v "${v}")
        string(REPLACE ";" "." v "${v}")
        set(found_version "llama ${v}")
    endif()
    file(STRINGS "${dir}/ggml/CMakeLists.txt" v REGEX "^set\\(GGML_VERSION_(MAJOR|MINOR|PATCH) ")
    if(v)
        string(REGEX REPLACE "set\\(GGML_VERSION_[A-Z]+ ([0-9]+)\\)" "\\1" v "${v}")
        string(REPLACE ";" "." v "${v}")
        string(APPEND found_version ", ggml ${v}")
    endif()
    if(EXISTS "${dir}/.git")
        find_package(Git QUIET)
        if(GIT_EXECUTABLE)
            execute_process(COMMAND "${GIT_EXECUTABLE}" describe --tags --always
                WORKING_DIRECTORY "${dir}" OUTPUT_VARIABLE d OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
            if(d)
                string(APPEND found_version ", git ${d}")
            endif()
        endif()
    endif()
    list(LENGTH differ n)
    list(SUBLIST differ 0 12 shown)
    string(REPLACE ";" ", " shown "${shown}")
    string(CONCAT msg "llama_memory: ${dir} is not the llama.cpp the drop-in's adapters and the ggml bindings "
            "were written for.\n  expected: ${expected}\n  found:    ${found_version}\n"
            "  ${n} of the pinned files differ: ${shown}\n"
            "Use the pinned tree (leave LLAMA_CPP_DIR unset), or -DLLAMA_MEMORY_ALLOW_OTHER_LLAMA_CPP=ON "
            "to try this one anyway.")
    if(allow)
        message(WARNING "${msg}")
    else()
        message(FATAL_ERROR "${msg}")
    endif()
endfunction()
