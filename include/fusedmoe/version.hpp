// fusedmoe/version.hpp — library version.
#pragma once

#define FUSEDMOE_VERSION_MAJOR 0
#define FUSEDMOE_VERSION_MINOR 1
#define FUSEDMOE_VERSION_PATCH 0
#define FUSEDMOE_VERSION_STRING "0.1.0"
