# Finds TensorRT (10 or newer) for the DeLeakerAttention plugin; included by CMakeLists.txt and
# runnable alone (`cmake -DTensorRT_ROOT=... -P plugins/tensorrt/FindDeleakerTensorRT.cmake`).
#
# Inputs (cache or -D): TensorRT_ROOT, or TensorRT_INCLUDE_DIR and TensorRT_LIB_DIR; the
# environment variable TensorRT_ROOT is used when none is given.
# Sets: DELEAKER_TRT_FOUND (ON/OFF), DELEAKER_TRT_REASON (why not, one line),
#       DELEAKER_TRT_INCLUDE_DIR, DELEAKER_TRT_LIBRARY, DELEAKER_TRT_VERSION.
if(NOT CMAKE_FIND_LIBRARY_PREFIXES)  # script mode (-P) sets no platform defaults
  set(CMAKE_FIND_LIBRARY_PREFIXES "lib")
  set(CMAKE_FIND_LIBRARY_SUFFIXES ".so")
endif()
if(NOT TensorRT_ROOT AND DEFINED ENV{TensorRT_ROOT})
  set(TensorRT_ROOT "$ENV{TensorRT_ROOT}")
endif()

set(DELEAKER_TRT_FOUND OFF)
set(DELEAKER_TRT_REASON "")
set(_dl_trt_hint "set TensorRT_ROOT (or TensorRT_INCLUDE_DIR and TensorRT_LIB_DIR) to a TensorRT 10+ install")

if(TensorRT_INCLUDE_DIR)
  set(_dl_trt_inc_hints "${TensorRT_INCLUDE_DIR}")
else()
  set(_dl_trt_inc_hints "${TensorRT_ROOT}/include")
endif()
find_path(DELEAKER_TRT_INCLUDE_DIR NvInferRuntime.h HINTS ${_dl_trt_inc_hints}
          PATHS /usr/include/x86_64-linux-gnu /usr/include /usr/local/TensorRT/include)
if(TensorRT_LIB_DIR)
  set(_dl_trt_lib_hints "${TensorRT_LIB_DIR}")
else()
  set(_dl_trt_lib_hints "${TensorRT_ROOT}/lib" "${TensorRT_ROOT}/lib64")
endif()
find_library(DELEAKER_TRT_LIBRARY NAMES nvinfer nvinfer_10 nvinfer_11 HINTS ${_dl_trt_lib_hints}
             PATHS /usr/lib/x86_64-linux-gnu /usr/local/TensorRT/lib)

if(NOT DELEAKER_TRT_INCLUDE_DIR)
  set(DELEAKER_TRT_REASON "TensorRT headers (NvInferRuntime.h) not found; ${_dl_trt_hint}")
elseif(NOT DELEAKER_TRT_LIBRARY)
  set(DELEAKER_TRT_REASON "TensorRT headers found in ${DELEAKER_TRT_INCLUDE_DIR} but not libnvinfer; ${_dl_trt_hint}")
else()
  file(STRINGS "${DELEAKER_TRT_INCLUDE_DIR}/NvInferVersion.h" _dl_trt_ver REGEX "#define (NV_TENSORRT_MAJOR|TRT_MAJOR_ENTERPRISE|NV_TENSORRT_MINOR|TRT_MINOR_ENTERPRISE) +[0-9]+")
  string(REGEX MATCH "(NV_TENSORRT_MAJOR|TRT_MAJOR_ENTERPRISE) +([0-9]+)" _dl_m "${_dl_trt_ver}")
  set(_dl_major "${CMAKE_MATCH_2}")
  string(REGEX MATCH "(NV_TENSORRT_MINOR|TRT_MINOR_ENTERPRISE) +([0-9]+)" _dl_m "${_dl_trt_ver}")
  set(_dl_minor "${CMAKE_MATCH_2}")
  set(DELEAKER_TRT_VERSION "${_dl_major}.${_dl_minor}")
  if(_dl_major STREQUAL "" OR _dl_major LESS 10)
    set(DELEAKER_TRT_REASON "TensorRT ${DELEAKER_TRT_VERSION} in ${DELEAKER_TRT_INCLUDE_DIR} is older than 10 (IPluginV3 needs 10+)")
  else()
    set(DELEAKER_TRT_FOUND ON)
  endif()
endif()

if(CMAKE_SCRIPT_MODE_FILE)
  if(DELEAKER_TRT_FOUND)
    message(STATUS "deleaker: TensorRT ${DELEAKER_TRT_VERSION} (${DELEAKER_TRT_INCLUDE_DIR}, ${DELEAKER_TRT_LIBRARY})")
  else()
    message(STATUS "deleaker: skipping the TensorRT plugin: ${DELEAKER_TRT_REASON}")
  endif()
endif()
