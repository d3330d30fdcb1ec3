//! Bounded decoding of nested field tables and arrays (`parsing::MAX_NESTING_DEPTH`).

use amq_protocol_types::{
    generation::{gen_field_table, gen_value},
    parsing::{MAX_NESTING_DEPTH, parse_field_array, parse_field_table, parse_value},
    *,
};

use cookie_factory::r#gen as cf_gen;

/// `depth` field arrays nested in one another (`kind` b'A'), or field tables each holding the
/// next under the key "k" (`kind` b'F'), around an innermost `Boolean(true)`, encoded by hand
/// (generating such a value would recurse as deep).
fn nested(kind: u8, depth: usize) -> Vec<u8> {
    let mut inner = vec![b't', 1];
    for _ in 0..depth {
        let mut v = vec![kind];
        let body_len = inner.len() + if kind == b'F' { 2 } else { 0 };
        v.extend((body_len as u32).to_be_bytes());
        if kind == b'F' {
            v.extend([1, b'k']);
        }
        v.extend(&inner);
        inner = v;
    }
    inner
}

/// Walks down a nested value: how many tables/arrays were decoded and what sits below them.
fn descend(mut value: &AMQPValue) -> (usize, &AMQPValue) {
    let mut depth = 0;
    loop {
        let next = match value {
            AMQPValue::FieldArray(a) => a.as_slice().first(),
            AMQPValue::FieldTable(t) => t.inner().get("k"),
            _ => return (depth, value),
        };
        match next {
            Some(v) => {
                depth += 1;
                value = v;
            }
            None => return (depth + 1, value),
        }
    }
}

/// Runs `f` on a thread with a small stack: a parse that still recursed per level would
/// overflow it long before the depths used here.
fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    // Debug builds use about 9 KB of stack per decoded level, release builds about 1.5 KB.
    let stack = (MAX_NESTING_DEPTH + 16) * 12 * 1024;
    std::thread::Builder::new()
        .stack_size(stack)
        .spawn(f)
        .expect("spawn")
        .join()
        .expect("parse on a small stack")
}

#[test]
fn deep_arrays_and_tables_are_decoded_up_to_the_limit_and_kept_whole_past_it() {
    for kind in [b'A', b'F'] {
        for depth in [
            1,
            MAX_NESTING_DEPTH - 1,
            MAX_NESTING_DEPTH,
            MAX_NESTING_DEPTH + 1,
            2_000,
            100_000,
        ] {
            let input = nested(kind, depth);
            let input2 = input.clone();
            let (rest, value) =
                on_small_stack(move || parse_value(&input2[..]).map(|(r, v)| (r.len(), v)))
                    .expect("decoded");
            assert_eq!(rest, 0, "kind {kind} depth {depth}: all input consumed");
            let (decoded, below) = descend(&value);
            if depth <= MAX_NESTING_DEPTH {
                assert_eq!(decoded, depth, "kind {kind}: every level decoded");
                assert_eq!(below, &AMQPValue::Boolean(true));
            } else {
                assert_eq!(decoded, MAX_NESTING_DEPTH, "kind {kind} depth {depth}");
                // The rest is kept as its encoded form, which decodes again.
                let AMQPValue::ByteArray(raw) = below else {
                    panic!("kind {kind} depth {depth}: undecoded rest is a byte array: {below:?}");
                };
                let expected = nested(kind, depth - MAX_NESTING_DEPTH);
                assert_eq!(raw.as_slice(), &expected[..], "kind {kind} depth {depth}");
                if depth - MAX_NESTING_DEPTH <= MAX_NESTING_DEPTH {
                    let (rest, again) = parse_value(raw.as_slice()).expect("raw rest decodes");
                    assert!(rest.is_empty());
                    assert_eq!(
                        descend(&again),
                        (depth - MAX_NESTING_DEPTH, &AMQPValue::Boolean(true))
                    );
                }
            }
            // Dropping is recursive too: bounded by the same depth.
            on_small_stack(move || drop(value));
            drop(input);
        }
    }
}

#[test]
fn depth_counts_from_the_outermost_table_or_array() {
    // A headers table is the first level: its values may nest MAX_NESTING_DEPTH - 1 deeper.
    let inner = nested(b'A', MAX_NESTING_DEPTH);
    let mut table = vec![1, b'h'];
    table.extend(&inner);
    let mut input = (table.len() as u32).to_be_bytes().to_vec();
    input.extend(&table);
    let (rest, t) = parse_field_table(&input[..]).expect("decoded");
    assert!(rest.is_empty());
    let (decoded, below) = descend(t.inner().get("h").expect("h"));
    assert_eq!(decoded, MAX_NESTING_DEPTH - 1);
    assert!(matches!(below, AMQPValue::ByteArray(b) if b.as_slice() == &nested(b'A', 1)[..]));

    let mut input = (inner.len() as u32 - 5).to_be_bytes().to_vec();
    input.extend(&inner[5..]);
    let (rest, a) = parse_field_array(&input[..]).expect("decoded");
    assert!(rest.is_empty());
    assert_eq!(descend(&AMQPValue::FieldArray(a)).0, MAX_NESTING_DEPTH);
}

#[test]
fn deep_values_next_to_ordinary_ones_leave_those_intact() {
    let mut table = FieldTable::default();
    table.insert("before".into(), AMQPValue::LongString("b".into()));
    table.insert("after".into(), AMQPValue::LongLongInt(-7));
    let mut buf = vec![0u8; 64];
    let len = {
        let (_, n) = cf_gen(gen_field_table(&table), &mut buf[..]).expect("gen");
        n as usize
    };
    buf.truncate(len);
    // Append a 10,000-deep entry and fix up the table's length.
    let deep = nested(b'A', 10_000);
    buf.extend([4, b'd', b'e', b'e', b'p']);
    buf.extend(&deep);
    let body_len = (buf.len() - 4) as u32;
    buf[..4].copy_from_slice(&body_len.to_be_bytes());
    let (rest, parsed) =
        on_small_stack(move || parse_field_table(&buf[..]).map(|(r, t)| (r.len(), t)))
            .expect("decoded");
    assert_eq!(rest, 0);
    assert_eq!(parsed.inner().get("before"), table.inner().get("before"));
    assert_eq!(parsed.inner().get("after"), table.inner().get("after"));
    assert_eq!(
        descend(parsed.inner().get("deep").expect("deep")).0,
        MAX_NESTING_DEPTH - 1
    );
}

#[test]
fn wide_tables_and_arrays_are_decoded_whole() {
    let mut table = FieldTable::default();
    let mut array = Vec::new();
    for i in 0..20_000u32 {
        table.insert(format!("h{i}").into(), AMQPValue::LongUInt(i));
        array.push(AMQPValue::Void);
    }
    table.insert("voids".into(), AMQPValue::FieldArray(array.into()));
    let value = AMQPValue::FieldTable(table);
    let mut buf = vec![0u8; 1 << 20];
    let (_, n) = cf_gen(gen_value(&value), &mut buf[..]).expect("gen");
    let (rest, parsed) = parse_value(&buf[..n as usize]).expect("decoded");
    assert!(rest.is_empty());
    assert_eq!(parsed, value);
}

#[test]
fn every_field_type_round_trips_at_every_depth_up_to_the_limit() {
    let mut leaves = FieldTable::default();
    let all = [
        AMQPValue::Boolean(true),
        AMQPValue::ShortShortInt(-8),
        AMQPValue::ShortShortUInt(200),
        AMQPValue::ShortInt(-1600),
        AMQPValue::ShortUInt(64_000),
        AMQPValue::LongInt(-320_000),
        AMQPValue::LongUInt(4_000_000_000),
        AMQPValue::LongLongInt(i64::MIN),
        AMQPValue::Float(1.5),
        AMQPValue::Double(-2.25e300),
        AMQPValue::DecimalValue(DecimalValue {
            scale: 3,
            value: 123_456,
        }),
        // No ShortString: it has no type tag on the wire ('s' is a ShortInt, as in RabbitMQ).
        AMQPValue::LongString("long \u{0} string".into()),
        AMQPValue::FieldArray(vec![AMQPValue::Void, AMQPValue::Boolean(false)].into()),
        AMQPValue::Timestamp(1_700_000_000),
        AMQPValue::FieldTable(FieldTable::default()),
        AMQPValue::ByteArray(vec![0, 255, 1].into()),
        AMQPValue::Void,
    ];
    for (i, v) in all.iter().enumerate() {
        leaves.insert(format!("f{i}").into(), v.clone());
    }
    // Leaves at depth d (the leaves' own table included), every d up to the limit minus one
    // for the "f13"/"f15" containers inside them: all of it decodes back unchanged.
    for d in 1..MAX_NESTING_DEPTH {
        let mut value = AMQPValue::FieldTable(leaves.clone());
        for level in 1..d {
            value = if level % 2 == 0 {
                AMQPValue::FieldArray(vec![value].into())
            } else {
                let mut t = FieldTable::default();
                t.insert("k".into(), value);
                AMQPValue::FieldTable(t)
            };
        }
        let mut buf = vec![0u8; 16 * 1024];
        let (_, n) = cf_gen(gen_value(&value), &mut buf[..]).expect("gen");
        let (rest, parsed) = parse_value(&buf[..n as usize]).expect("decoded");
        assert!(rest.is_empty(), "depth {d}");
        assert_eq!(parsed, value, "depth {d}");
    }
}

#[test]
fn truncated_or_lying_lengths_are_errors_not_panics() {
    for kind in [b'A', b'F'] {
        let input = nested(kind, MAX_NESTING_DEPTH + 10);
        for cut in [
            1,
            5,
            6,
            MAX_NESTING_DEPTH * 5,
            MAX_NESTING_DEPTH * 5 + 3,
            input.len() - 1,
        ] {
            assert!(
                parse_value(&input[..cut]).is_err(),
                "kind {kind} cut at {cut}"
            );
        }
        // A length that claims more than the enclosing table holds, past the limit.
        let mut lying = input.clone();
        let at = MAX_NESTING_DEPTH * if kind == b'F' { 7 } else { 5 } + 1;
        lying[at..at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(
            parse_value(&lying[..]).is_err(),
            "kind {kind}: lying length"
        );
    }
}
