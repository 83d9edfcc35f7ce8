// specmoe/specmoe.hpp: everything a user of the host reference needs, in one include.
#pragma once

#include <specmoe/config.hpp>

#include <specmoe/core/bfloat16.hpp>
#include <specmoe/core/counters.hpp>
#include <specmoe/core/dispatch_layout.hpp>
#include <specmoe/core/error.hpp>
#include <specmoe/core/expert_placement.hpp>
#include <specmoe/core/expert_weights.hpp>
#include <specmoe/core/matrix_view.hpp>
#include <specmoe/core/moe_config.hpp>
#include <specmoe/core/routing.hpp>
#include <specmoe/core/spaces.hpp>
#include <specmoe/core/token_plan.hpp>

#include <specmoe/comm/concepts.hpp>
#include <specmoe/grouping/concepts.hpp>
#include <specmoe/placement/concepts.hpp>
#include <specmoe/prefetch/concepts.hpp>
#include <specmoe/router/concepts.hpp>
#include <specmoe/router/gate.hpp>
#include <specmoe/router/predictors.hpp>

#include <specmoe/layer/dense_reference.hpp>
#include <specmoe/layer/host_moe_layer.hpp>
#include <specmoe/layer/moe_layer.hpp>
#include <specmoe/trace/profile.hpp>
#include <specmoe/trace/routing_trace.hpp>
