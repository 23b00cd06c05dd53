// Row kernels for any processor (the compiler's baseline instruction set).
#define UE_ISA base
#include "row_kernels_impl.h"
