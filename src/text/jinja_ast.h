// Internal to the Jinja engine: the syntax tree shared by jinja_parse.cpp and jinja_eval.cpp.
#pragma once
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "text/jinja_value.h"

namespace ds::jinja::detail {

struct Expr;
using ExprPtr = std::unique_ptr<Expr>;

struct Expr {
  enum class Kind {
    kLiteral,  // literal
    kName,     // name
    kAttr,     // args[0].name
    kItem,     // args[0][args[1]]
    kSlice,    // args[0][args[1]:args[2]:args[3]] (null = omitted)
    kCall,     // args[0](args[1..], kwargs)
    kFilter,   // args[0] | name(args[1..], kwargs)
    kTest,     // args[0] is [not] name(args[1..])
    kNeg,      // -args[0]
    kPos,      // +args[0]
    kBinary,   // args[0] op args[1]: + - * / // % ** ~
    kCompare,  // args[0] ops[0] args[1] ops[1] args[2] ... (==, !=, <, <=, >, >=, in, notin)
    kAnd,
    kOr,
    kNot,
    kCond,     // args[0] if args[1] else args[2] (args[2] null = undefined)
    kList,
    kTuple,
    kDict,     // args = key0, value0, key1, value1, ...
  };
  Kind kind;
  int line = 0, col = 0;
  Value literal;
  std::string name;  // name / attribute / filter / test / binary operator
  bool negated = false;
  std::vector<ExprPtr> args;
  std::vector<std::pair<std::string, ExprPtr>> kwargs;
  std::vector<std::string> ops;
};

struct Stmt;
using Body = std::vector<std::unique_ptr<Stmt>>;

struct Stmt {
  enum class Kind {
    kText,      // text
    kOutput,    // {{ expr }}
    kIf,        // branches (cond, body); else_body
    kFor,       // for targets in expr [if cond]: body; else_body
    kSet,       // set targets = expr  |  set targets[0].attr = expr
    kSetBlock,  // set targets[0] %} body {% endset (expr: optional filter chain applied to a kName "")
    kMacro,     // macro name(params) body
    kFilterBlock,  // filter chain (expr, operand kName "") over body
    kBreak,
    kContinue,
    kDo,        // do expr
    kScope,     // body rendered as-is ({% generation %} from transformers)
  };
  Kind kind;
  int line = 0, col = 0;
  std::string text;
  ExprPtr expr;
  ExprPtr cond;
  std::vector<std::pair<ExprPtr, Body>> branches;
  Body body, else_body;
  std::vector<std::string> targets;
  std::string attr;
  std::string name;
  std::vector<std::pair<std::string, ExprPtr>> params;  // macro parameters with optional defaults
};

struct Program {
  Body body;
};

std::unique_ptr<Program> parse(std::string_view source, bool trim_blocks, bool lstrip_blocks,
                               bool keep_trailing_newline);

}  // namespace ds::jinja::detail
