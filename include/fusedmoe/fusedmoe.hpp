// fusedmoe/fusedmoe.hpp — umbrella header of the C++ API.
#pragma once

#include "fusedmoe/config.hpp"
#include "fusedmoe/error.hpp"
#include "fusedmoe/layout.hpp"
#include "fusedmoe/moe_layer.hpp"
#include "fusedmoe/noise.hpp"
#include "fusedmoe/planner.hpp"
#include "fusedmoe/saved_state.hpp"
#include "fusedmoe/timeline.hpp"
#include "fusedmoe/transport.hpp"
#include "fusedmoe/version.hpp"
