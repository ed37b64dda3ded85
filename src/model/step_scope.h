// A backend step (Backend::step_begin/step_end) held for a scope: ends the step on every path, so an error leaves
// the backend usable. For the recorded steps of model/.
#pragma once
#include "backend/ops.h"

namespace ds::model {

struct StepScope {
  Backend& be;
  explicit StepScope(Backend& b) : be(b) { be.step_begin(); }
  ~StepScope() { be.step_end(); }
  StepScope(const StepScope&) = delete;
  StepScope& operator=(const StepScope&) = delete;
};

}  // namespace ds::model
