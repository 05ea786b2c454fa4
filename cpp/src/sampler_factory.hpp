#pragma once

#include <memory>

#include "json_fields.hpp"
#include "l2c/sampler.hpp"

namespace l2c::detail {

// The sampler of a manifest's `sampler` section, chosen by its `kind`.
std::shared_ptr<const Sampler> make_sampler(const Fields& section, bool learn_sigma);

}  // namespace l2c::detail
