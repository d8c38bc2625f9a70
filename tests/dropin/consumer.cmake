# The `dropin_consumer` ctest test: an existing llama.cpp consumer switches to the drop-in by
# install prefix alone and gets stock's results.
#
#   1. `cmake --install <build> --prefix <work>/prefix` (the project's whole install: the drop-in
#      libllama in upstream's shape, ggml, and this library; the Rust library is built first
#      when the build tree does not have it yet, as `cmake --install` needs every installed
#      file).
#   2. The consumer, two ways, from tests/dropin/equivalence.c (llama.h only) unchanged:
#      (a) a CMake project, tests/dropin/consumer/ (find_package(llama) +
#          target_link_libraries(app PRIVATE llama)), CMAKE_PREFIX_PATH=<prefix>; it finds the
#          libraries through the RUNPATH CMake gives a build-tree executable;
#      (b) pkg-config: `cc equivalence.c $(pkg-config --cflags --libs llama) -lm` with
#          PKG_CONFIG_PATH=<prefix>/lib/pkgconfig, run with LD_LIBRARY_PATH=<prefix>/lib.
#   3. ldd: both load libllama and ggml from <prefix>/lib, and that libllama is the drop-in
#      (its symbol table has this library's llama_memory_dropin_* functions, stock's has none).
#   4. Both run on the generated model with ARGS; their outputs equal, byte for byte, that of
#      the stock harness (dropin_equivalence_stock: equivalence.c against stock libllama).
#
# With -DSTATIC=ON (a BUILD_SHARED_LIBS=OFF tree): the install has libllama.a (the Rust
# archive merged in) and static ggml; pkg-config is asked for --static flags; step 3 checks the
# executables themselves (they contain the drop-in's llama_memory_dropin_* code and load no
# libllama or ggml).
#
#   cmake -DBUILD_DIR=<build> -DRUST_LIBRARY=<libllama_memory> -DRUST_TARGET=<target>
#         -DSTOCK=<stock harness> -DSOURCE=<equivalence.c> -DCONSUMER_DIR=<tests/dropin/consumer>
#         -DMODEL=<gguf> -DARGS=<a,b,...> -DWORK=<dir> -DCC=<C compiler> -DCXX=<C++ compiler>
#         -DGENERATOR=<generator> -DPKG_CONFIG=<pkg-config> -DNM=<nm> [-DSTATIC=ON] -P consumer.cmake
cmake_minimum_required(VERSION 3.21)

foreach(var BUILD_DIR STOCK SOURCE CONSUMER_DIR MODEL WORK CC CXX)
    if(NOT ${var})
        message(FATAL_ERROR "consumer.cmake needs -D${var}=...")
    endif()
endforeach()
if(NOT EXISTS "${MODEL}")
    message(FATAL_ERROR "no model ${MODEL} (the dropin_models test writes it)")
endif()
string(REPLACE "," ";" args "${ARGS}")

function(run what)
    string(TIMESTAMP t0 "%s")
    execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
    string(TIMESTAMP t1 "%s")
    math(EXPR dt "${t1} - ${t0}")
    if(NOT rc EQUAL 0)
        string(REPLACE ";" " " cmd "${ARGN}")
        message(FATAL_ERROR "${what} failed (${rc}): ${cmd}\n${out}${err}")
    endif()
    message(STATUS "${what}: ok (${dt} s)")
    set(run_out "${out}" PARENT_SCOPE)
endfunction()

set(prefix "${WORK}/prefix")
file(REMOVE_RECURSE "${WORK}")
file(MAKE_DIRECTORY "${WORK}")

#
# 1. The install
#

if(RUST_LIBRARY AND RUST_TARGET AND NOT EXISTS "${RUST_LIBRARY}")
    message(STATUS "${RUST_LIBRARY} is not built yet (cmake --install installs it too): "
                   "building target ${RUST_TARGET}")
    run("build ${RUST_TARGET}" "${CMAKE_COMMAND}" --build "${BUILD_DIR}" --target "${RUST_TARGET}")
endif()
run("cmake --install ${BUILD_DIR} --prefix ${prefix}"
    "${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${prefix}")
set(libdir "${prefix}/lib")
if(STATIC)
    set(libllama "${libdir}/libllama.a")
else()
    set(libllama "${libdir}/libllama.so")
endif()
foreach(f "${libllama}" "${libdir}/cmake/llama/llama-config.cmake"
          "${libdir}/pkgconfig/llama.pc" "${prefix}/include/llama.h")
    if(NOT EXISTS "${f}")
        message(FATAL_ERROR "the install has no ${f}")
    endif()
endforeach()

#
# 2. The two consumers
#

# (a) CMake
set(cmake_build "${WORK}/cmake-consumer")
set(gen_args "")
if(GENERATOR)
    set(gen_args -G "${GENERATOR}")
endif()
run("configure the CMake consumer (find_package(llama))"
    "${CMAKE_COMMAND}" -S "${CONSUMER_DIR}" -B "${cmake_build}" ${gen_args}
    "-DCMAKE_PREFIX_PATH=${prefix}" "-DCONSUMER_SOURCE=${SOURCE}"
    "-DCMAKE_C_COMPILER=${CC}" "-DCMAKE_CXX_COMPILER=${CXX}" -DCMAKE_BUILD_TYPE=Release)
if(NOT run_out MATCHES "llama [^\n]* from ${libdir}")
    message(FATAL_ERROR "the CMake consumer did not find llama in ${libdir}:\n${run_out}")
endif()
run("build the CMake consumer" "${CMAKE_COMMAND}" --build "${cmake_build}")
set(app_cmake "${cmake_build}/app")

# (b) pkg-config
if(NOT PKG_CONFIG)
    message(FATAL_ERROR "no pkg-config (-DPKG_CONFIG=...)")
endif()
set(ENV{PKG_CONFIG_PATH} "${libdir}/pkgconfig")
unset(ENV{PKG_CONFIG_LIBDIR})
set(pc_static "")
if(STATIC)
    set(pc_static --static)
endif()
run("pkg-config ${pc_static} --cflags --libs llama" "${PKG_CONFIG}" ${pc_static} --cflags --libs llama)
string(STRIP "${run_out}" pc_flags)
message(STATUS "  ${pc_flags}")
# (llama.pc is relocatable: its prefix is ${pcfiledir}/../..)
set(pc_libdir "")
if(pc_flags MATCHES "(^| )-L([^ ]+)")
    file(REAL_PATH "${CMAKE_MATCH_2}" pc_libdir)
endif()
file(REAL_PATH "${libdir}" real_libdir)
if(NOT pc_libdir STREQUAL real_libdir)
    message(FATAL_ERROR "pkg-config's flags do not point at ${libdir}: ${pc_flags}")
endif()
separate_arguments(pc_flags UNIX_COMMAND "${pc_flags}")
set(app_pc "${WORK}/pkg-config-consumer/app")
file(MAKE_DIRECTORY "${WORK}/pkg-config-consumer")
run("build the pkg-config consumer (${CC})" "${CC}" -std=c11 -O2 "${SOURCE}" ${pc_flags} -lm -o "${app_pc}")

#
# 3. What they load
#

find_program(LDD ldd)
if(NOT LDD)
    message(FATAL_ERROR "no ldd")
endif()
set(no_ld_path "--unset=LD_LIBRARY_PATH")
set(ld_path "LD_LIBRARY_PATH=${libdir}")
foreach(consumer cmake pc)
    if(STATIC)
        # linked in: the executable has the drop-in's code, and loads no libllama or ggml
        execute_process(COMMAND "${NM}" "${app_${consumer}}" OUTPUT_VARIABLE syms ERROR_QUIET)
        string(REGEX MATCHALL "[ \t]llama_memory_dropin_[A-Za-z0-9_]+" dropin_syms "${syms}")
        list(LENGTH dropin_syms n_dropin_syms)
        if(n_dropin_syms EQUAL 0)
            message(FATAL_ERROR "${app_${consumer}} has no llama_memory_dropin_* symbol: not linked with the drop-in")
        endif()
        run("ldd ${app_${consumer}}" "${LDD}" "${app_${consumer}}")
        if(run_out MATCHES "lib(llama|ggml)")
            message(FATAL_ERROR "${app_${consumer}} loads a shared libllama or ggml:\n${run_out}")
        endif()
        message(STATUS "  ${app_${consumer}}: static, the drop-in inside (${n_dropin_syms} llama_memory_dropin_* symbols)")
        continue()
    endif()
    if(consumer STREQUAL "cmake")
        set(env_arg "${no_ld_path}")
    else()
        set(env_arg "${ld_path}")
    endif()
    run("ldd ${app_${consumer}}" "${CMAKE_COMMAND}" -E env ${env_arg} "${LDD}" "${app_${consumer}}")
    set(ldd_out "${run_out}")
    foreach(lib libllama libggml libggml-base)
        if(NOT ldd_out MATCHES "[ \t]${lib}\\.so[.0-9]* => ([^ \n]+)")
            message(FATAL_ERROR "ldd ${app_${consumer}} does not show ${lib}:\n${ldd_out}")
        endif()
        get_filename_component(loaded_dir "${CMAKE_MATCH_1}" DIRECTORY)
        file(REAL_PATH "${loaded_dir}" loaded_dir)
        if(NOT loaded_dir STREQUAL real_libdir)
            message(FATAL_ERROR "${app_${consumer}} loads ${lib} from ${CMAKE_MATCH_1}, not from ${libdir}:\n${ldd_out}")
        endif()
        message(STATUS "  ${lib} => ${CMAKE_MATCH_1}")
    endforeach()
endforeach()
if(NM AND NOT STATIC)
    execute_process(COMMAND "${NM}" "${libdir}/libllama.so" OUTPUT_VARIABLE syms ERROR_QUIET RESULT_VARIABLE rc)
    string(REGEX MATCHALL "[ \t]llama_memory_dropin_[A-Za-z0-9_]+" dropin_syms "${syms}")
    list(LENGTH dropin_syms n_dropin_syms)
    if(NOT rc EQUAL 0 OR n_dropin_syms EQUAL 0)
        message(FATAL_ERROR "${libdir}/libllama.so has no llama_memory_dropin_* symbol: not the drop-in")
    endif()
    message(STATUS "the installed libllama is the drop-in (${n_dropin_syms} llama_memory_dropin_* symbols inside)")
endif()

#
# 4. Same results as stock
#

set(outs "")
foreach(variant stock cmake pc)
    set(out "${WORK}/out.${variant}.txt")
    if(variant STREQUAL "stock")
        set(cmd "${CMAKE_COMMAND}" -E env "${STOCK}")
    elseif(variant STREQUAL "cmake")
        set(cmd "${CMAKE_COMMAND}" -E env ${no_ld_path} "${app_cmake}")
    else()
        set(cmd "${CMAKE_COMMAND}" -E env ${ld_path} "${app_pc}")
    endif()
    run("run ${variant}" ${cmd} "${MODEL}" "${out}" ${args})
    file(SHA256 "${out}" sha)
    file(SIZE "${out}" size)
    message(STATUS "  ${variant}: ${size} bytes, sha256 ${sha}")
endforeach()
foreach(variant cmake pc)
    execute_process(COMMAND "${CMAKE_COMMAND}" -E compare_files "${WORK}/out.stock.txt" "${WORK}/out.${variant}.txt"
        RESULT_VARIABLE same)
    if(NOT same EQUAL 0)
        message(FATAL_ERROR "the ${variant} consumer's output differs from stock's: "
                            "${WORK}/out.stock.txt ${WORK}/out.${variant}.txt")
    endif()
endforeach()
message(STATUS "identical: the installed drop-in, through find_package(llama) and through pkg-config, "
               "gives stock's output byte for byte")
