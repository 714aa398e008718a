"""Build the text-to-SQL example: a small shop database and question/SQL pairs over it.

Run ``python lorakit/examples/sql/build.py`` (or ``--out DIR``) to (re)create

* ``shop.db``      -- customers, products, orders (SQLite, a few hundred rows),
* ``train.jsonl``  -- about 400 ``{"prompt", "completion"}`` pairs,
* ``eval.jsonl``   -- about 100 pairs whose SQL never occurs in train.

Everything is drawn from one seeded ``random.Random``, so two runs write identical jsonl files.
Questions come from templates: each template has slots (city, category, year, ...), several
phrasings and one SQL pattern in a fixed style (uppercase keywords, single quotes, the same
JOIN form everywhere), so the mapping question -> SQL is learnable. The split is by filled-in
query: a template's slot combinations are divided between train and eval, so an eval question
asks for a combination the model never saw with its answer. Only the standard library is used.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sqlite3
from pathlib import Path

SEED = 20240611
N_TRAIN = 400
N_EVAL = 100
EVAL_COMBO_SHARE = 0.25  # share of each template's slot combinations held out for eval

SCHEMA_LINE = ("Schema: customers(id, name, city, joined_year); "
               "products(id, name, category, price); "
               "orders(id, customer_id, product_id, quantity, order_year)")

CITIES = ["Lyon", "Paris", "Berlin", "Madrid", "Rome", "Lisbon", "Vienna", "Dublin", "Oslo",
          "Prague"]
CITY_WEIGHTS = [9, 14, 12, 10, 8, 6, 7, 5, 4, 5]
FIRST_NAMES = ["Alice", "Bruno", "Clara", "David", "Elena", "Felix", "Greta", "Hugo", "Ines",
               "Jonas", "Karin", "Lucas", "Maria", "Nils", "Olga", "Pablo", "Quentin", "Rosa",
               "Simon", "Tara", "Ulrich", "Vera", "Walter", "Yasmin", "Zoe", "Anton", "Bianca",
               "Carlos", "Dora", "Emil"]
LAST_NAMES = ["Martin", "Schmidt", "Garcia", "Rossi", "Silva", "Novak", "Murphy", "Hansen",
              "Dubois", "Weber", "Lopez", "Bianchi", "Costa", "Berg", "Fischer", "Moreau",
              "Keller", "Ferrari", "Santos", "Walsh"]
JOINED_YEARS = list(range(2015, 2025))
ORDER_YEARS = list(range(2019, 2025))

# (name, category, price): prices are all distinct, so ORDER BY price has no ties
PRODUCTS = [
    ("Wireless Mouse", "electronics", 24.99), ("USB Charger", "electronics", 19.49),
    ("Bluetooth Speaker", "electronics", 59.0), ("Headphones", "electronics", 189.99),
    ("Webcam", "electronics", 45.5), ("Mechanical Keyboard", "electronics", 89.9),
    ("Smart Watch", "electronics", 149.0),
    ("Cookbook", "books", 29.95), ("Travel Guide", "books", 18.75),
    ("Science Fiction Novel", "books", 12.99), ("History Atlas", "books", 39.0),
    ("Poetry Collection", "books", 14.5), ("Picture Book", "books", 9.99),
    ("Dictionary", "books", 24.0),
    ("Puzzle Set", "toys", 16.99), ("Building Blocks", "toys", 34.99),
    ("Toy Train", "toys", 42.0), ("Plush Bear", "toys", 19.99), ("Kite", "toys", 11.49),
    ("Board Game", "toys", 27.5), ("Remote Control Car", "toys", 64.99),
    ("Chef Knife", "kitchen", 54.0), ("Coffee Grinder", "kitchen", 38.9),
    ("Blender", "kitchen", 79.99), ("Cast Iron Pan", "kitchen", 44.95),
    ("Cutting Board", "kitchen", 17.25), ("Tea Kettle", "kitchen", 32.0),
    ("Measuring Cups", "kitchen", 8.99),
    ("Garden Hose", "garden", 29.0), ("Pruning Shears", "garden", 21.99),
    ("Watering Can", "garden", 13.75), ("Flower Seeds", "garden", 4.99),
    ("Lawn Sprinkler", "garden", 26.5), ("Garden Gloves", "garden", 9.49),
    ("Wheelbarrow", "garden", 119.0),
    ("Yoga Mat", "sports", 23.99), ("Tennis Racket", "sports", 84.5),
    ("Football", "sports", 22.5), ("Running Shoes", "sports", 99.95),
    ("Water Bottle", "sports", 12.49), ("Dumbbell Set", "sports", 129.0),
    ("Cycling Helmet", "sports", 49.99),
]
CATEGORIES = ["electronics", "books", "toys", "kitchen", "garden", "sports"]
PRICE_THRESHOLDS = [10, 15, 20, 25, 30, 40, 50, 60, 75, 100]
JOIN_CUSTOMERS = "FROM orders JOIN customers ON orders.customer_id = customers.id"
JOIN_PRODUCTS = "FROM orders JOIN products ON orders.product_id = products.id"


def build_db(path: Path, rng: random.Random) -> dict:
    """Create the shop database at ``path``; return the slot values the templates draw from."""
    path.unlink(missing_ok=True)
    customers = []
    names = rng.sample([f"{f} {l}" for f in FIRST_NAMES for l in LAST_NAMES], 150)
    for cid, name in enumerate(names, start=1):
        city = rng.choices(CITIES, weights=CITY_WEIGHTS)[0]
        customers.append((cid, name, city, rng.choice(JOINED_YEARS)))
    products = [(pid, *p) for pid, p in enumerate(PRODUCTS, start=1)]
    orders = []
    for oid in range(1, 601):
        cust = rng.choice(customers)
        # a customer orders only from the year they joined on
        year = rng.randint(max(cust[3], ORDER_YEARS[0]), ORDER_YEARS[-1])
        product = rng.choice(products)
        quantity = rng.choices([1, 2, 3, 4, 5], weights=[45, 25, 15, 10, 5])[0]
        orders.append((oid, cust[0], product[0], quantity, year))

    con = sqlite3.connect(path)
    con.executescript("""
        CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE,
                                city TEXT NOT NULL, joined_year INTEGER NOT NULL);
        CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE,
                               category TEXT NOT NULL, price REAL NOT NULL);
        CREATE TABLE orders (id INTEGER PRIMARY KEY,
                             customer_id INTEGER NOT NULL REFERENCES customers(id),
                             product_id INTEGER NOT NULL REFERENCES products(id),
                             quantity INTEGER NOT NULL, order_year INTEGER NOT NULL);
    """)
    con.executemany("INSERT INTO customers VALUES (?, ?, ?, ?)", customers)
    con.executemany("INSERT INTO products VALUES (?, ?, ?, ?)", products)
    con.executemany("INSERT INTO orders VALUES (?, ?, ?, ?, ?)", orders)
    con.commit()
    con.execute("VACUUM")
    con.close()
    return {
        "city": CITIES, "category": CATEGORIES, "jyear": JOINED_YEARS, "oyear": ORDER_YEARS,
        "price": PRICE_THRESHOLDS, "k": [2, 3, 4, 5], "q": [1, 2, 3],
        "name": sorted(c[1] for c in customers), "product": [p[0] for p in PRODUCTS],
    }


# (template id, slot names, phrasings, SQL). {year} in text/SQL is filled from jyear or oyear.
TEMPLATES = [
    ("count_city", ["city"],
     ["How many customers live in {city}?", "Count the customers from {city}.",
      "What is the number of customers based in {city}?"],
     "SELECT COUNT(*) FROM customers WHERE city = '{city}';"),
    ("count_joined", ["jyear"],
     ["How many customers joined in {jyear}?", "Count the customers who signed up in {jyear}.",
      "What is the number of customers that joined in {jyear}?"],
     "SELECT COUNT(*) FROM customers WHERE joined_year = {jyear};"),
    ("count_joined_after", ["jyear"],
     ["How many customers joined after {jyear}?",
      "Count the customers who signed up later than {jyear}.",
      "What is the number of customers with a joined year after {jyear}?"],
     "SELECT COUNT(*) FROM customers WHERE joined_year > {jyear};"),
    ("count_joined_before", ["jyear"],
     ["How many customers joined before {jyear}?",
      "Count the customers who signed up earlier than {jyear}.",
      "What is the number of customers with a joined year before {jyear}?"],
     "SELECT COUNT(*) FROM customers WHERE joined_year < {jyear};"),
    ("names_city", ["city"],
     ["List the names of customers in {city}.", "Which customers live in {city}?",
      "Give the names of all customers from {city}."],
     "SELECT name FROM customers WHERE city = '{city}';"),
    ("names_city_joined", ["city", "jyear"],
     ["Which customers from {city} joined in {jyear}?",
      "List the customers in {city} who signed up in {jyear}.",
      "Give the names of {city} customers that joined in {jyear}."],
     "SELECT name FROM customers WHERE city = '{city}' AND joined_year = {jyear};"),
    ("city_of", ["name"],
     ["Which city does {name} live in?", "What city is {name} from?",
      "Where is the customer {name} based?"],
     "SELECT city FROM customers WHERE name = '{name}';"),
    ("joined_of", ["name"],
     ["In what year did {name} join?", "When did the customer {name} sign up?",
      "What is the joined year of {name}?"],
     "SELECT joined_year FROM customers WHERE name = '{name}';"),
    ("count_category", ["category", "price"],
     ["How many {category} products cost more than {price} dollars?",
      "Count the products in the {category} category priced above {price}.",
      "What is the number of {category} products with a price over {price}?"],
     "SELECT COUNT(*) FROM products WHERE category = '{category}' AND price > {price};"),
    ("names_cheaper", ["price"],
     ["Which products cost less than {price} dollars?", "List the products priced under {price}.",
      "Give the names of products with a price below {price}."],
     "SELECT name FROM products WHERE price < {price};"),
    ("names_category_pricier", ["category", "price"],
     ["Which {category} products cost more than {price} dollars?",
      "List the {category} products priced above {price}.",
      "Give the names of {category} products with a price over {price}."],
     "SELECT name FROM products WHERE category = '{category}' AND price > {price};"),
    ("avg_price", ["category"],
     ["What is the average price of {category} products?",
      "What do {category} products cost on average?",
      "Give the mean price in the {category} category."],
     "SELECT AVG(price) FROM products WHERE category = '{category}';"),
    ("max_price", ["category"],
     ["What is the highest price among {category} products?",
      "How much does the most expensive {category} product cost?",
      "Give the maximum price in the {category} category."],
     "SELECT MAX(price) FROM products WHERE category = '{category}';"),
    ("min_price", ["category"],
     ["What is the lowest price among {category} products?",
      "How much does the cheapest {category} product cost?",
      "Give the minimum price in the {category} category."],
     "SELECT MIN(price) FROM products WHERE category = '{category}';"),
    ("price_of", ["product"],
     ["How much does the {product} cost?", "What is the price of the {product}?",
      "Give the price of {product}."],
     "SELECT price FROM products WHERE name = '{product}';"),
    ("category_of", ["product"],
     ["Which category is the {product} in?", "What category does the {product} belong to?",
      "Give the category of {product}."],
     "SELECT category FROM products WHERE name = '{product}';"),
    ("count_orders_year", ["oyear", "q"],
     ["How many orders in {oyear} had a quantity above {q}?",
      "Count the orders from {oyear} with more than {q} items.",
      "What is the number of orders placed in {oyear} with quantity greater than {q}?"],
     "SELECT COUNT(*) FROM orders WHERE order_year = {oyear} AND quantity > {q};"),
    ("sum_quantity_year", ["oyear"],
     ["What is the total quantity ordered in {oyear}?",
      "How many items were ordered in total in {oyear}?",
      "Give the sum of order quantities for {oyear}."],
     "SELECT SUM(quantity) FROM orders WHERE order_year = {oyear};"),
    ("group_city", ["jyear"],
     ["How many customers joined after {jyear} in each city?",
      "For each city, count the customers who signed up after {jyear}.",
      "Give the number of customers per city among those who joined after {jyear}."],
     "SELECT city, COUNT(*) FROM customers WHERE joined_year > {jyear} GROUP BY city;"),
    ("group_category", ["price"],
     ["For each category, how many products cost more than {price} dollars?",
      "Count the products priced above {price} per category.",
      "How many products in each category have a price over {price}?"],
     "SELECT category, COUNT(*) FROM products WHERE price > {price} GROUP BY category;"),
    ("top_pricey", ["category", "k"],
     ["What are the {k} most expensive {category} products?",
      "List the top {k} {category} products by price.",
      "Give the names of the {k} priciest products in the {category} category."],
     "SELECT name FROM products WHERE category = '{category}' ORDER BY price DESC LIMIT {k};"),
    ("top_cheap", ["k"],
     ["What are the {k} cheapest products?", "List the {k} lowest priced products.",
      "Give the names of the {k} least expensive products."],
     "SELECT name FROM products ORDER BY price ASC LIMIT {k};"),
    ("alpha_city", ["city"],
     ["List the customers in {city} in alphabetical order.",
      "Give the names of customers from {city} sorted by name.",
      "Which customers live in {city}, ordered alphabetically?"],
     "SELECT name FROM customers WHERE city = '{city}' ORDER BY name ASC;"),
    ("distinct_cities", ["jyear"],
     ["Which cities have customers who joined in {jyear}?",
      "List the distinct cities of customers that signed up in {jyear}.",
      "In which cities do the customers who joined in {jyear} live?"],
     "SELECT DISTINCT city FROM customers WHERE joined_year = {jyear};"),
    ("distinct_categories", ["price"],
     ["Which categories have products cheaper than {price} dollars?",
      "List the distinct categories of products priced under {price}.",
      "In which categories can you find a product below {price}?"],
     "SELECT DISTINCT category FROM products WHERE price < {price};"),
    ("orders_by_city", ["city"],
     ["How many orders were placed by customers from {city}?",
      "Count the orders made by customers living in {city}.",
      "What is the number of orders from customers in {city}?"],
     f"SELECT COUNT(*) {JOIN_CUSTOMERS} WHERE customers.city = '{{city}}';"),
    ("orders_by_name", ["name"],
     ["How many orders has {name} placed?", "Count the orders made by {name}.",
      "What is the number of orders from the customer {name}?"],
     f"SELECT COUNT(*) {JOIN_CUSTOMERS} WHERE customers.name = '{{name}}';"),
    ("units_of_product", ["product"],
     ["How many units of the {product} were ordered in total?",
      "What is the total quantity ordered of the {product}?",
      "Give the sum of ordered quantities for {product}."],
     f"SELECT SUM(orders.quantity) {JOIN_PRODUCTS} WHERE products.name = '{{product}}';"),
    ("orders_category_year", ["category", "oyear"],
     ["How many {category} orders were placed in {oyear}?",
      "Count the orders for {category} products in {oyear}.",
      "What is the number of {category} product orders from {oyear}?"],
     f"SELECT COUNT(*) {JOIN_PRODUCTS} "
     "WHERE products.category = '{category}' AND orders.order_year = {oyear};"),
]


def useful(con: sqlite3.Connection, sql: str) -> bool:
    """True when ``sql`` runs and answers with something (not no rows, NULL or a zero count)."""
    try:
        rows = con.execute(sql).fetchall()
    except sqlite3.Error:
        return False
    return bool(rows) and rows not in ([(None,)], [(0,)])


def make_pairs(con: sqlite3.Connection, slots: dict, rng: random.Random):
    """Fill the templates; return per-template lists of train and eval (question, sql) pools."""
    pools = []
    for tid, names, phrasings, sql_pattern in TEMPLATES:
        combos = []
        for values in itertools.product(*(slots[n] for n in names)):
            filled = dict(zip(names, values))
            sql = sql_pattern.format(**filled)
            if useful(con, sql):
                combos.append(filled)
        if len(combos) < 4:
            raise RuntimeError(f"template {tid} has only {len(combos)} usable slot values")
        rng.shuffle(combos)
        n_eval = max(1, round(EVAL_COMBO_SHARE * len(combos)))
        split = {"eval": combos[:n_eval], "train": combos[n_eval:]}
        pool = {}
        for part, part_combos in split.items():
            # one question per combination first (phrasing drawn at random), then the rest
            first, rest = [], []
            for filled in part_combos:
                texts = [p.format(**filled) for p in phrasings]
                rng.shuffle(texts)
                sql = sql_pattern.format(**filled)
                first.append((texts[0], sql))
                rest.extend((t, sql) for t in texts[1:])
            rng.shuffle(rest)
            pool[part] = first + rest
        pools.append(pool)
    return pools


def draw(pools: list[dict], part: str, n: int, rng: random.Random) -> list[tuple[str, str]]:
    """Take ``n`` pairs round-robin over templates (random template order each round)."""
    taken, cursors = [], [0] * len(pools)
    while len(taken) < n:
        order = list(range(len(pools)))
        rng.shuffle(order)
        progressed = False
        for i in order:
            if len(taken) == n:
                break
            if cursors[i] < len(pools[i][part]):
                taken.append(pools[i][part][cursors[i]])
                cursors[i] += 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"only {len(taken)} {part} pairs available, wanted {n}")
    return taken


def write_jsonl(path: Path, pairs: list[tuple[str, str]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for question, sql in pairs:
            record = {"prompt": f"{SCHEMA_LINE}\nQuestion: {question}", "completion": sql}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def build(out: Path) -> dict:
    """Write shop.db, train.jsonl and eval.jsonl into ``out``; return counts."""
    rng = random.Random(SEED)
    out.mkdir(parents=True, exist_ok=True)
    slots = build_db(out / "shop.db", rng)
    con = sqlite3.connect(out / "shop.db")
    try:
        pools = make_pairs(con, slots, rng)
        train = draw(pools, "train", N_TRAIN, rng)
        evals = draw(pools, "eval", N_EVAL, rng)
        rng.shuffle(train)
        rng.shuffle(evals)
        # the held-out guarantees the tests also check
        assert not {q for q, _ in train} & {q for q, _ in evals}
        assert not {s for _, s in train} & {s for _, s in evals}
        assert len({q for q, _ in train + evals}) == len(train) + len(evals)
        assert all(useful(con, s) for _, s in train + evals)
    finally:
        con.close()
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "eval.jsonl", evals)
    return {"templates": len(TEMPLATES), "train": len(train), "eval": len(evals)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="folder to write shop.db, train.jsonl and eval.jsonl into")
    args = parser.parse_args(argv)
    print(json.dumps(build(args.out)))


if __name__ == "__main__":
    main()
