// Stored Responses (docs/server.md "Responses API: stored responses"): what GET /v1/responses/{id},
// previous_response_id, input_items, cancel and background runs read. In memory, bounded by bytes
// (--responses-store MIB): the least recently used finished responses go first; a running one is never evicted.
//
// A conversation continued by previous_response_id is a chain of nodes, each holding one response's own input items
// and, once it has finished, its output items: a response's context is its predecessors' items then its own input,
// so a long conversation is stored once, not once per turn. A node is counted against the budget while anything
// (a stored response, a later node of its chain) still holds it.
#pragma once
#include <atomic>
#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <tuple>
#include <unordered_map>
#include <unordered_set>

namespace ds::server {

struct ResponseRun;  // a background run (server.cpp): its events, for GET ?stream=true and cancel

class ResponseStore {
 public:
  using json = nlohmann::ordered_json;

  struct Node {
    std::shared_ptr<const Node> prev;  // the previous response's node, or null
    json input = json::array();        // this response's own input items (each with an id)
    json output = json::array();       // its output items, set when it finishes
    ~Node();

   private:
    friend class ResponseStore;
    std::shared_ptr<std::atomic<int64_t>> live_;  // the store's count of bytes in nodes still held
    int64_t bytes_ = 0;
    std::shared_ptr<struct ItemIndex> index_;     // the store's item index, which this node's ids leave with it
    std::vector<std::string> indexed_;
  };

  struct Found {
    json response;                       // the response object as it stands
    std::shared_ptr<const Node> node;    // its conversation
    bool running = false;                // begun, not finished
    std::shared_ptr<ResponseRun> run;    // background responses' run
  };

  explicit ResponseStore(int64_t max_bytes);
  int64_t max_bytes() const { return max_bytes_; }

  // A node for a response whose own input items are `input`, after `prev` (null: a conversation's start).
  std::shared_ptr<Node> node(std::shared_ptr<const Node> prev, json input);

  // A response begins: saved now (GET finds it, running); finish() gives its final object and output items.
  void begin(const std::string& id, json response, std::shared_ptr<Node> node, std::shared_ptr<ResponseRun> run = {});
  void update(const std::string& id, json response);  // a running response's object as it stands
  // `extra_bytes`: memory the entry holds beside them (a background run's events), counted with its node.
  void finish(const std::string& id, json response, json output, int64_t extra_bytes = 0);

  std::optional<Found> get(const std::string& id);  // a use: the response becomes the most recently used
  // An input or output item of any stored conversation by its id (an item_reference), or nullopt.
  std::optional<json> find_item(const std::string& item_id) const;
  bool erase(const std::string& id);

  // Every item of a chain in order: the predecessors' inputs and outputs, then `n`'s input (and its output too when
  // with_output).
  static json items(const Node* n, bool with_output);

  int64_t bytes() const { return live_->load(); }
  size_t size() const;

 private:
  struct Entry {
    json response;
    std::shared_ptr<Node> node;
    std::shared_ptr<ResponseRun> run;
    bool running = true;
    std::list<std::string>::iterator lru;
  };
  void evict();  // under mu_: oldest finished first, until the live bytes fit
  void index_items(Node& n, bool output);  // under mu_: n's input or output items findable by id

  const int64_t max_bytes_;
  std::shared_ptr<std::atomic<int64_t>> live_ = std::make_shared<std::atomic<int64_t>>(0);
  mutable std::mutex mu_;
  std::unordered_map<std::string, Entry> entries_;
  std::list<std::string> lru_;  // most recently used first
  std::shared_ptr<ItemIndex> items_;
};

// Item id -> the stored node holding it, its output list or not, and the index there (find_item). Entries leave
// with their node (its destructor, which may run on any thread: the index has its own lock, taken after mu_).
struct ItemIndex {
  std::mutex mu;
  std::unordered_map<std::string, std::tuple<const ResponseStore::Node*, bool, size_t>> at;
};

}  // namespace ds::server
