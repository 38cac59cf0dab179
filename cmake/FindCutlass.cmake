# Locates the CUTLASS/CuTe headers: CUTLASS_PATH (env or cache) or the PyPI wheel
# nvidia-cutlass==4.2.0.0 (which ships them under cutlass_library/source/include).
# Defines the interface target fusedmoe_cutlass.
set(_cutlass_hints "")
if(DEFINED ENV{CUTLASS_PATH})
  list(APPEND _cutlass_hints "$ENV{CUTLASS_PATH}/include" "$ENV{CUTLASS_PATH}")
endif()
if(CUTLASS_PATH)
  list(APPEND _cutlass_hints "${CUTLASS_PATH}/include" "${CUTLASS_PATH}")
endif()
find_package(Python3 COMPONENTS Interpreter QUIET)
if(Python3_Interpreter_FOUND)
  execute_process(
    COMMAND ${Python3_EXECUTABLE} -c "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source', 'include'))"
    OUTPUT_VARIABLE _cutlass_py OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  if(_cutlass_py)
    list(APPEND _cutlass_hints "${_cutlass_py}")
  endif()
endif()
find_path(FUSEDMOE_CUTLASS_INCLUDE cute/tensor.hpp HINTS ${_cutlass_hints})
if(NOT FUSEDMOE_CUTLASS_INCLUDE)
  message(FATAL_ERROR "CUTLASS/CuTe headers not found: pip install nvidia-cutlass==4.2.0.0 or set CUTLASS_PATH")
endif()
message(STATUS "fusedmoe: CuTe headers in ${FUSEDMOE_CUTLASS_INCLUDE}")
add_library(fusedmoe_cutlass INTERFACE)
target_include_directories(fusedmoe_cutlass SYSTEM INTERFACE ${FUSEDMOE_CUTLASS_INCLUDE})
