use model::LocalModel;
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let m = LocalModel::open(&a[1], &mut |_, _| {}).unwrap();
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&a[2]).unwrap()).unwrap();
    for g in r["generations"].as_array().unwrap() {
        let p: Vec<u32> = g["prompt_token_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        let gen: Vec<u32> = g["generated_token_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        let mut kv = m.new_cache(p.len() + gen.len() + 1).unwrap();
        let mut l = m.forward(&p, &mut kv, 0).unwrap();
        let mut out = vec![];
        for (i, &t) in gen.iter().enumerate() {
            let max = l.iter().copied().fold(f32::MIN, f32::max) as f64;
            let lse = l.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln() + max;
            out.push(format!("{:.4}", l[t as usize] as f64 - lse));
            l = m.forward(&[t], &mut kv, p.len() + i).unwrap();
        }
        println!("{:?} ref {:?}", out, g["chosen_logprob_per_position"]);
    }
}
