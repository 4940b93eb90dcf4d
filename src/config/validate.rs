//! Semantic checks over a typed config: names, references, cycles and
//! resource races. Every check runs and adds its problems; nothing stops
//! at the first one.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::diagnostic::{Problem, ProblemKind, did_you_mean};
use super::{Config, Job, valid_name};

pub fn check(config: &Config, problems: &mut Vec<Problem>) {
    duplicates(config, problems);
    let index: HashMap<&str, usize> = config.jobs.iter().enumerate().map(|(i, j)| (j.name.as_str(), i)).collect();
    references(config, &index, problems);
    let has_cycle = cycles(config, &index, problems);
    if !has_cycle {
        races(config, &index, problems);
    }
}

fn duplicates(config: &Config, problems: &mut Vec<Problem>) {
    let mut seen: HashMap<&str, ()> = HashMap::new();
    for j in &config.jobs {
        if seen.insert(&j.name, ()).is_some() {
            problems.push(
                Problem::new(ProblemKind::Duplicate, Some(j.spans.name.clone()), format!("job {:?} is defined twice", j.name))
                    .label("second definition")
                    .hint("job names are unique; rename one of them"),
            );
        }
    }
    let mut seen = HashSet::new();
    for e in &config.environments {
        if !seen.insert(&e.name) {
            problems.push(
                Problem::new(ProblemKind::Duplicate, Some(e.span.clone()), format!("environment {:?} is defined twice", e.name)).label("second definition"),
            );
        }
    }
    let mut seen = HashSet::new();
    for s in &config.services {
        if !seen.insert(&s.name) {
            problems
                .push(Problem::new(ProblemKind::Duplicate, Some(s.span.clone()), format!("service {:?} is defined twice", s.name)).label("second definition"));
        }
    }
}

fn references(config: &Config, index: &HashMap<&str, usize>, problems: &mut Vec<Problem>) {
    let env_names: Vec<&str> = config.environments.iter().map(|e| e.name.as_str()).collect();
    for e in &config.environments {
        let (Some(from), Some(span)) = (&e.promote_from, &e.promote_from_span) else { continue };
        if from == &e.name {
            problems.push(Problem::new(ProblemKind::Cycle, Some(span.clone()), format!("environment {:?} promotes from itself", e.name)).label("itself"));
        } else if !env_names.contains(&from.as_str()) {
            problems.push(
                Problem::new(ProblemKind::UnknownReference, Some(span.clone()), format!("environment {:?} promotes from unknown environment {from:?}", e.name))
                    .label("no such environment")
                    .hint(format!("declared environments: {}", env_names.join(", "))),
            );
        } else {
            // staging → production → staging would wait for itself forever.
            let mut at = from.as_str();
            let mut steps = 0;
            while let Some(next) = config.environment(at).and_then(|x| x.promote_from.as_deref()) {
                steps += 1;
                if next == e.name || steps > env_names.len() {
                    problems.push(
                        Problem::new(ProblemKind::Cycle, Some(span.clone()), format!("promotions of environment {:?} form a cycle", e.name)).label("cycle"),
                    );
                    break;
                }
                at = next;
            }
        }
    }
    let service_names: Vec<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
    for job in &config.jobs {
        let mut seen = HashSet::new();
        for (need, span) in job.needs.iter().zip(&job.spans.needs) {
            if need == &job.name {
                problems.push(
                    Problem::new(ProblemKind::Cycle, Some(span.clone()), format!("job {:?} needs itself", job.name))
                        .label("itself")
                        .hint("remove it from `needs`"),
                );
            } else if !index.contains_key(need.as_str()) {
                let hint = match did_you_mean(need, index.keys().copied()) {
                    Some(s) => format!("did you mean {s:?}?"),
                    None => "`needs` names other jobs of this file".to_string(),
                };
                problems.push(
                    Problem::new(ProblemKind::UnknownReference, Some(span.clone()), format!("job {:?} needs unknown job {need:?}", job.name))
                        .label("no such job")
                        .hint(hint),
                );
            } else if !seen.insert(need) {
                problems.push(
                    Problem::new(ProblemKind::Duplicate, Some(span.clone()), format!("job {:?} lists {need:?} twice in `needs`", job.name))
                        .label("listed again"),
                );
            }
        }
        if let (Some(svc), Some(span)) = (&job.service, &job.spans.service)
            && !service_names.contains(&svc.as_str())
        {
            let hint = match did_you_mean(svc, service_names.iter().copied()) {
                Some(s) => format!("did you mean {s:?}?"),
                None => "declare it in a [[service]] table".to_string(),
            };
            problems.push(
                Problem::new(ProblemKind::UnknownReference, Some(span.clone()), format!("job {:?} belongs to unknown service {svc:?}", job.name))
                    .label("no such service")
                    .hint(hint),
            );
        }
        if let Some(envs) = &job.environments {
            for (env, span) in envs.iter().zip(&job.spans.environments) {
                if !env_names.contains(&env.as_str()) {
                    let hint = match did_you_mean(env, env_names.iter().copied()) {
                        Some(s) => format!("did you mean {s:?}?"),
                        None if env_names.is_empty() => "declare it in an [[environment]] table".to_string(),
                        None => format!("declared environments: {}", env_names.join(", ")),
                    };
                    problems.push(
                        Problem::new(ProblemKind::UnknownReference, Some(span.clone()), format!("job {:?} names unknown environment {env:?}", job.name))
                            .label("no such environment")
                            .hint(hint),
                    );
                }
            }
        }
        for (res, span) in job.reads.iter().chain(&job.writes).zip(job.spans.reads.iter().chain(&job.spans.writes)) {
            if !valid_name(res) {
                problems.push(
                    Problem::new(ProblemKind::InvalidValue, Some(span.clone()), format!("invalid resource name {res:?}"))
                        .label("invalid name")
                        .hint("resource names use letters, digits, '-', '_' and '.'"),
                );
            }
        }
    }
}

/// Report every cycle (once each) with its path. Returns whether any exists.
fn cycles(config: &Config, index: &HashMap<&str, usize>, problems: &mut Vec<Problem>) -> bool {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    let n = config.jobs.len();
    let mut mark = vec![Mark::New; n];
    let mut found = false;
    let mut reported: HashSet<Vec<usize>> = HashSet::new();
    // Iterative DFS: a recursive one overflows the stack on long chains.
    for root in 0..n {
        if mark[root] != Mark::New {
            continue;
        }
        let mut stack: Vec<(usize, usize)> = vec![(root, 0)];
        mark[root] = Mark::Active;
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            let job = &config.jobs[node];
            if *next < job.needs.len() {
                let edge = *next;
                *next += 1;
                let Some(&dep) = index.get(job.needs[edge].as_str()) else { continue };
                if dep == node {
                    continue; // reported as "needs itself"
                }
                match mark[dep] {
                    Mark::New => {
                        mark[dep] = Mark::Active;
                        stack.push((dep, 0));
                    }
                    Mark::Active => {
                        found = true;
                        let start = stack.iter().position(|(s, _)| *s == dep).unwrap_or(0);
                        let members: Vec<usize> = stack[start..].iter().map(|(s, _)| *s).collect();
                        let mut key = members.clone();
                        key.sort_unstable();
                        if reported.insert(key) {
                            // `needs` point from a job to what runs before it; print
                            // the path in run order.
                            let mut names: Vec<&str> = members.iter().rev().map(|m| config.jobs[*m].name.as_str()).collect();
                            names.push(config.jobs[*members.last().unwrap_or(&dep)].name.as_str());
                            problems.push(
                                Problem::new(ProblemKind::Cycle, Some(job.spans.needs[edge].clone()), format!("dependency cycle: {}", names.join(" → ")))
                                    .label("closes the cycle")
                                    .hint("a job cannot run before itself; remove one of these `needs`"),
                            );
                        }
                    }
                    Mark::Done => {}
                }
            } else {
                mark[node] = Mark::Done;
                stack.pop();
            }
        }
    }
    found
}

/// Ancestors (transitive `needs`) of every job, as bitsets.
pub(crate) fn ancestors(jobs: &[Job], index: &HashMap<&str, usize>) -> Vec<Vec<u64>> {
    let n = jobs.len();
    let words = n.div_ceil(64);
    let mut anc = vec![vec![0u64; words]; n];
    for i in topo_order(jobs, index) {
        let mut set = vec![0u64; words];
        for need in &jobs[i].needs {
            if let Some(&d) = index.get(need.as_str()) {
                set[d / 64] |= 1 << (d % 64);
                for (w, a) in set.iter_mut().zip(&anc[d]) {
                    *w |= *a;
                }
            }
        }
        anc[i] = set;
    }
    anc
}

/// Jobs in an order where every job comes after its needs (Kahn). Jobs on
/// a cycle are left out; callers check cycles first.
pub(crate) fn topo_order(jobs: &[Job], index: &HashMap<&str, usize>) -> Vec<usize> {
    let n = jobs.len();
    let mut indegree = vec![0usize; n];
    let mut dependants: Vec<Vec<usize>> = vec![vec![]; n];
    for (i, j) in jobs.iter().enumerate() {
        for need in &j.needs {
            if let Some(&d) = index.get(need.as_str()) {
                indegree[i] += 1;
                dependants[d].push(i);
            }
        }
    }
    let mut ready: std::collections::VecDeque<usize> = (0..n).filter(|i| indegree[*i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop_front() {
        order.push(i);
        for &d in &dependants[i] {
            indegree[d] -= 1;
            if indegree[d] == 0 {
                ready.push_back(d);
            }
        }
    }
    order
}

fn races(config: &Config, index: &HashMap<&str, usize>, problems: &mut Vec<Problem>) {
    let anc = ancestors(&config.jobs, index);
    let ordered = |a: usize, b: usize| anc[a][b / 64] & (1 << (b % 64)) != 0 || anc[b][a / 64] & (1 << (a % 64)) != 0;
    let disjoint_envs = |a: &Job, b: &Job| match (&a.environments, &b.environments) {
        (Some(x), Some(y)) => !x.iter().any(|e| y.contains(e)),
        _ => false,
    };
    // resource -> (writers with span, readers with span)
    type Users = (Vec<(usize, std::ops::Range<usize>)>, Vec<(usize, std::ops::Range<usize>)>);
    let mut by_resource: BTreeMap<&str, Users> = BTreeMap::new();
    for (i, j) in config.jobs.iter().enumerate() {
        for (r, s) in j.writes.iter().zip(&j.spans.writes) {
            by_resource.entry(r).or_default().0.push((i, s.clone()));
        }
        for (r, s) in j.reads.iter().zip(&j.spans.reads) {
            by_resource.entry(r).or_default().1.push((i, s.clone()));
        }
    }
    for (res, (writers, readers)) in &by_resource {
        for (x, (a, _)) in writers.iter().enumerate() {
            for (b, span) in &writers[x + 1..] {
                let (ja, jb) = (&config.jobs[*a], &config.jobs[*b]);
                if a != b && !ordered(*a, *b) && !disjoint_envs(ja, jb) {
                    problems.push(
                        Problem::new(
                            ProblemKind::WriteRace,
                            Some(span.clone()),
                            format!("jobs {:?} and {:?} both write {res:?} with no order between them", ja.name, jb.name),
                        )
                        .label("unordered writer")
                        .hint(format!("add needs = [{:?}] to job {:?} (or the reverse) so they cannot run at once", ja.name, jb.name)),
                    );
                }
            }
            for (r, span) in readers {
                let (jw, jr) = (&config.jobs[*a], &config.jobs[*r]);
                if a != r && !ordered(*a, *r) && !disjoint_envs(jw, jr) {
                    problems.push(
                        Problem::new(
                            ProblemKind::ReadRace,
                            Some(span.clone()),
                            format!("job {:?} reads {res:?}, which job {:?} writes, with no order between them", jr.name, jw.name),
                        )
                        .label("unordered reader")
                        .hint(format!("add needs = [{:?}] to job {:?} if it must see the write", jw.name, jr.name)),
                    );
                }
            }
        }
    }
}
