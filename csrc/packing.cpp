// CPU hot paths for sequence packing and data-parallel balancing.
//
// Both functions are deterministic and mirror, step for step, the pure-Python
// references in orz_fast/packing.py, which the tests compare against.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <queue>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

// First-fit decreasing with a max segment tree over the bins' free capacity,
// so finding the first bin that fits is O(log bins) instead of a scan.
class FirstFitTree {
 public:
  FirstFitTree(int64_t max_bins, int64_t capacity) : size_(1) {
    while (size_ < max_bins) size_ <<= 1;
    tree_.assign(2 * size_, capacity);
  }
  // Leftmost bin whose free capacity is >= need (the tree always has one).
  int64_t find(int64_t need) const {
    int64_t node = 1;
    while (node < size_) node = (tree_[2 * node] >= need) ? 2 * node : 2 * node + 1;
    return node - size_;
  }
  void take(int64_t bin, int64_t amount) {
    int64_t node = bin + size_;
    tree_[node] -= amount;
    for (node >>= 1; node >= 1; node >>= 1)
      tree_[node] = std::max(tree_[2 * node], tree_[2 * node + 1]);
  }

 private:
  int64_t size_;
  std::vector<int64_t> tree_;
};

std::vector<std::vector<int64_t>> pack_by_token_budget(
    py::array_t<int64_t, py::array::c_style | py::array::forcecast> lengths_arr,
    int64_t max_tokens) {
  if (max_tokens <= 0) throw std::invalid_argument("max_tokens must be > 0, got " + std::to_string(max_tokens));
  auto lengths = lengths_arr.unchecked<1>();
  const int64_t n = lengths.shape(0);
  for (int64_t i = 0; i < n; ++i) {
    if (lengths(i) < 0)
      throw std::invalid_argument("sample " + std::to_string(i) + " has negative length " + std::to_string(lengths(i)));
    if (lengths(i) > max_tokens)
      throw std::invalid_argument("sample " + std::to_string(i) + " has " + std::to_string(lengths(i)) +
                                  " tokens, more than max_tokens=" + std::to_string(max_tokens));
  }
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return lengths(a) > lengths(b); });

  std::vector<std::vector<int64_t>> bins;
  FirstFitTree tree(std::max<int64_t>(n, 1), max_tokens);
  {
    py::gil_scoped_release release;
    for (int64_t idx : order) {
      const int64_t bin = tree.find(lengths(idx));
      if (bin == static_cast<int64_t>(bins.size())) bins.emplace_back();
      bins[bin].push_back(idx);
      tree.take(bin, lengths(idx));
    }
  }
  return bins;
}

// First-fit decreasing for samples that share their prompt within a bin: a sample costs its own tokens
// in a bin that already holds a sample of its group (prompt), and its own plus the prompt's elsewhere.
// Samples go in decreasing order of their cost alone (prompt + own; ties keep index order) to the first
// bin already holding their group where their own tokens fit, else the first bin where both fit (a new
// one if none). Each bin lists its samples grouped by group, groups in order of arrival.
std::vector<std::vector<int64_t>> pack_shared_prompts(
    py::array_t<int64_t, py::array::c_style | py::array::forcecast> own_arr,
    py::array_t<int64_t, py::array::c_style | py::array::forcecast> group_arr,
    py::array_t<int64_t, py::array::c_style | py::array::forcecast> prompt_arr,
    int64_t max_tokens) {
  if (max_tokens <= 0) throw std::invalid_argument("max_tokens must be > 0, got " + std::to_string(max_tokens));
  auto own = own_arr.unchecked<1>();
  auto group = group_arr.unchecked<1>();
  auto prompt = prompt_arr.unchecked<1>();
  const int64_t n = own.shape(0);
  if (group.shape(0) != n || prompt.shape(0) != n)
    throw std::invalid_argument("own, group and prompt lengths must have one entry per sample");
  for (int64_t i = 0; i < n; ++i) {
    if (own(i) < 0 || prompt(i) < 0)
      throw std::invalid_argument("sample " + std::to_string(i) + " has a negative length");
    if (own(i) + prompt(i) > max_tokens)
      throw std::invalid_argument("sample " + std::to_string(i) + " has " + std::to_string(own(i) + prompt(i)) +
                                  " tokens, more than max_tokens=" + std::to_string(max_tokens));
  }
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return own(a) + prompt(a) > own(b) + prompt(b); });

  // Per bin its groups (group id, samples), and per group id the (bin, position) of its runs.
  std::vector<std::vector<std::pair<int64_t, std::vector<int64_t>>>> bins;
  std::vector<int64_t> free;
  std::unordered_map<int64_t, std::vector<std::pair<int64_t, int64_t>>> runs;
  FirstFitTree tree(std::max<int64_t>(n, 1), max_tokens);
  {
    py::gil_scoped_release release;
    for (int64_t idx : order) {
      auto& mine = runs[group(idx)];
      int64_t bin = -1, pos = -1;
      for (const auto& [b, p] : mine)
        if (free[b] >= own(idx) && (bin < 0 || b < bin)) bin = b, pos = p;
      int64_t cost = own(idx);
      if (bin < 0) {
        cost += prompt(idx);
        bin = tree.find(cost);
        if (bin == static_cast<int64_t>(bins.size())) {
          bins.emplace_back();
          free.push_back(max_tokens);
        }
        pos = static_cast<int64_t>(bins[bin].size());
        bins[bin].emplace_back(group(idx), std::vector<int64_t>());
        mine.emplace_back(bin, pos);
      }
      bins[bin][pos].second.push_back(idx);
      free[bin] -= cost;
      tree.take(bin, cost);
    }
  }
  std::vector<std::vector<int64_t>> out(bins.size());
  for (size_t b = 0; b < bins.size(); ++b)
    for (const auto& run : bins[b]) out[b].insert(out[b].end(), run.second.begin(), run.second.end());
  return out;
}

// One partial solution of the k-way largest differencing method: k groups,
// kept sorted by workload, largest first.
struct PartialSolution {
  std::vector<double> sums;
  std::vector<std::vector<int64_t>> groups;
  double spread() const { return sums.front() - sums.back(); }
};

void sort_groups_desc(PartialSolution& s) {
  const size_t k = s.sums.size();
  std::vector<size_t> order(k);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return s.sums[a] > s.sums[b]; });
  PartialSolution sorted;
  sorted.sums.reserve(k);
  sorted.groups.reserve(k);
  for (size_t i : order) {
    sorted.sums.push_back(s.sums[i]);
    sorted.groups.push_back(std::move(s.groups[i]));
  }
  s = std::move(sorted);
}

std::vector<std::vector<int64_t>> balance(
    py::array_t<double, py::array::c_style | py::array::forcecast> workloads_arr, int64_t k, bool equal_size) {
  if (k < 1) throw std::invalid_argument("k must be >= 1, got " + std::to_string(k));
  auto workloads = workloads_arr.unchecked<1>();
  const int64_t n = workloads.shape(0);
  std::vector<PartialSolution> pool;
  {
    py::gil_scoped_release release;
    // Heap of (spread, -creation order) so ties pop the oldest solution first.
    using Entry = std::pair<double, int64_t>;
    std::priority_queue<Entry> heap;
    int64_t created = 0;
    auto push = [&](PartialSolution&& s) {
      sort_groups_desc(s);
      heap.emplace(s.spread(), -created);
      pool.push_back(std::move(s));
      ++created;
    };
    std::vector<int64_t> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return workloads(a) > workloads(b); });
    if (equal_size) {
      // Chunks of k items (largest first), one item per group; a short last
      // chunk leaves groups empty, so counts differ by at most one.
      for (int64_t start = 0; start < n; start += k) {
        PartialSolution s{std::vector<double>(k, 0.0), std::vector<std::vector<int64_t>>(k)};
        for (int64_t j = 0; j < k && start + j < n; ++j) {
          s.sums[j] = workloads(order[start + j]);
          s.groups[j].push_back(order[start + j]);
        }
        push(std::move(s));
      }
    } else {
      for (int64_t idx : order) {
        PartialSolution s{std::vector<double>(k, 0.0), std::vector<std::vector<int64_t>>(k)};
        s.sums[0] = workloads(idx);
        s.groups[0].push_back(idx);
        push(std::move(s));
      }
    }
    if (heap.empty()) return std::vector<std::vector<int64_t>>(k);
    while (heap.size() > 1) {
      const int64_t a = -heap.top().second;
      heap.pop();
      const int64_t b = -heap.top().second;
      heap.pop();
      // Largest group of one joins the smallest of the other.
      PartialSolution merged{std::vector<double>(k), std::vector<std::vector<int64_t>>(k)};
      PartialSolution& sa = pool[a];
      PartialSolution& sb = pool[b];
      for (int64_t j = 0; j < k; ++j) {
        merged.sums[j] = sa.sums[j] + sb.sums[k - 1 - j];
        merged.groups[j] = std::move(sa.groups[j]);
        auto& other = sb.groups[k - 1 - j];
        merged.groups[j].insert(merged.groups[j].end(), other.begin(), other.end());
      }
      sa = PartialSolution{};
      sb = PartialSolution{};
      push(std::move(merged));
    }
    PartialSolution& last = pool[-heap.top().second];
    for (auto& g : last.groups) std::sort(g.begin(), g.end());
    return std::move(last.groups);
  }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "orz_fast CPU hot paths (sequence packing, data-parallel balancing)";
  m.def("pack_by_token_budget", &pack_by_token_budget, py::arg("lengths"), py::arg("max_tokens"),
        "First-fit decreasing: bins of sample indices (int64 lengths), each bin's total <= max_tokens. "
        "Ties in length keep index order; bins are numbered in order of opening.");
  m.def("pack_shared_prompts", &pack_shared_prompts, py::arg("own"), py::arg("group"), py::arg("prompt"),
        py::arg("max_tokens"),
        "First-fit decreasing where a sample's prompt counts once per bin: bins of sample indices, each "
        "bin's own tokens plus one prompt per group <= max_tokens, samples grouped by group in each bin.");
  m.def("balance", &balance, py::arg("workloads"), py::arg("k"), py::arg("equal_size") = false,
        "k-way Karmarkar-Karp (largest differencing) partition of float64 workloads into k groups of "
        "sample indices (each sorted ascending), groups ordered by workload, largest first. With "
        "equal_size, group sizes differ by at most one.");
}
