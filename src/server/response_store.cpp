#include "server/response_store.h"

#include <vector>

namespace ds::server {

namespace {
int64_t json_bytes(const ResponseStore::json& j) { return int64_t(j.dump().size()); }
}  // namespace

ResponseStore::Node::~Node() {
  if (live_) live_->fetch_sub(bytes_);
  if (index_) {
    std::lock_guard<std::mutex> lock(index_->mu);
    for (auto& id : indexed_)
      if (auto it = index_->at.find(id); it != index_->at.end() && std::get<0>(it->second) == this) index_->at.erase(it);
  }
}

ResponseStore::ResponseStore(int64_t max_bytes) : max_bytes_(max_bytes), items_(std::make_shared<ItemIndex>()) {}

void ResponseStore::index_items(Node& n, bool output) {
  const json& list = output ? n.output : n.input;
  std::lock_guard<std::mutex> lock(items_->mu);
  n.index_ = items_;
  for (size_t i = 0; i < list.size(); ++i)
    if (list[i].is_object() && list[i].contains("id") && list[i]["id"].is_string()) {
      const std::string id = list[i]["id"].get<std::string>();
      items_->at[id] = {&n, output, i};
      n.indexed_.push_back(id);
    }
}

std::shared_ptr<ResponseStore::Node> ResponseStore::node(std::shared_ptr<const Node> prev, json input) {
  auto n = std::make_shared<Node>();
  n->prev = std::move(prev);
  n->input = std::move(input);
  n->bytes_ = json_bytes(n->input);
  n->live_ = live_;
  live_->fetch_add(n->bytes_);
  return n;
}

void ResponseStore::begin(const std::string& id, json response, std::shared_ptr<Node> node,
                          std::shared_ptr<ResponseRun> run) {
  std::lock_guard<std::mutex> lock(mu_);
  lru_.push_front(id);
  Entry& e = entries_[id];
  e.response = std::move(response);
  e.node = std::move(node);
  e.run = std::move(run);
  e.running = true;
  e.lru = lru_.begin();
  if (!e.node->index_) index_items(*e.node, false);  // a node is begun once
  evict();
}

void ResponseStore::update(const std::string& id, json response) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = entries_.find(id);
  if (it != entries_.end()) it->second.response = std::move(response);
}

void ResponseStore::finish(const std::string& id, json response, json output, int64_t extra_bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = entries_.find(id);
  if (it == entries_.end()) return;  // deleted while it ran
  Entry& e = it->second;
  Node& n = *e.node;
  n.output = std::move(output);
  index_items(n, true);
  // The output items and the response object (which repeats them) count from now on.
  const int64_t more = json_bytes(n.output) + json_bytes(response) + extra_bytes;
  n.bytes_ += more;
  live_->fetch_add(more);
  e.response = std::move(response);
  e.running = false;
  evict();
}

std::optional<ResponseStore::Found> ResponseStore::get(const std::string& id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = entries_.find(id);
  if (it == entries_.end()) return std::nullopt;
  Entry& e = it->second;
  lru_.splice(lru_.begin(), lru_, e.lru);
  return Found{e.response, e.node, e.running, e.run};
}

bool ResponseStore::erase(const std::string& id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = entries_.find(id);
  if (it == entries_.end()) return false;
  lru_.erase(it->second.lru);
  entries_.erase(it);
  return true;
}

std::optional<ResponseStore::json> ResponseStore::find_item(const std::string& item_id) const {
  std::lock_guard<std::mutex> lock(mu_);  // before the index's: finish() writes outputs under it
  std::lock_guard<std::mutex> ilock(items_->mu);
  auto it = items_->at.find(item_id);
  if (it == items_->at.end()) return std::nullopt;
  const auto& [n, output, i] = it->second;
  return (output ? n->output : n->input)[i];
}

size_t ResponseStore::size() const {
  std::lock_guard<std::mutex> lock(mu_);
  return entries_.size();
}

void ResponseStore::evict() {
  // From the least recently used end; running responses stay. A node a later response still holds frees nothing
  // yet, so eviction goes on to the next.
  for (auto it = lru_.end(); live_->load() > max_bytes_ && it != lru_.begin();) {
    --it;
    auto e = entries_.find(*it);
    if (e->second.running) continue;
    entries_.erase(e);
    it = lru_.erase(it);
  }
}

ResponseStore::json ResponseStore::items(const Node* n, bool with_output) {
  std::vector<const Node*> chain;
  for (const Node* p = n ? n->prev.get() : nullptr; p; p = p->prev.get()) chain.push_back(p);
  json out = json::array();
  for (auto it = chain.rbegin(); it != chain.rend(); ++it) {
    for (auto& i : (*it)->input) out.push_back(i);
    for (auto& i : (*it)->output) out.push_back(i);
  }
  if (n) {
    for (auto& i : n->input) out.push_back(i);
    if (with_output)
      for (auto& i : n->output) out.push_back(i);
  }
  return out;
}

}  // namespace ds::server
