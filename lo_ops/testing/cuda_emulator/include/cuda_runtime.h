// CUDA header for code compiled under the lo_ops CUDA emulator.
#pragma once
#include "../emulator.h"
